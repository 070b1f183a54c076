/*
 * The osvmm bare-metal guest runtime: what every guest may call.
 *
 * Entry (entry.S) sets up a GDT, a 64-bit TSS, an identity map of the first
 * 4 GiB (2 MiB pages, U bit set so CPL3 code may touch any of it), enters long
 * mode and calls rt_start(), which checks the hvm_start_info, copies the
 * command line, loads the IDT and calls the guest's guest_main() at CPL0.
 * README.md in the parent directory documents the conventions.
 */
#ifndef OSVMM_GUEST_RT_H
#define OSVMM_GUEST_RT_H

/* Selectors of the runtime's GDT (0x10/0x18 match the osvmm 64-bit entry). */
#define KERNEL_CS32 0x08
#define KERNEL_CS 0x10
#define KERNEL_DS 0x18
#define USER_DS 0x20
#define USER_CS 0x28
#define TSS_SEL 0x30

/* Ports. */
#define COM1_THR 0x3f8
#define COM1_LSR 0x3fd
#define LSR_THRE 0x20
#define DEBUG_EXIT_PORT 0xf4
#define PIT_CH0 0x40
#define PIT_MODE 0x43
#define PIT_HZ 1193182

/* Values written to the debug-exit port; QEMU exits with (V << 1) | 1. */
#define EXIT_OK 0
#define EXIT_FAIL 1       /* the guest's own check failed */
#define EXIT_BADARG 2     /* a bad key=value on the command line */
#define EXIT_NOSTART 3    /* no valid hvm_start_info */
#define EXIT_NOCLOCK 4    /* TSC calibration against the PIT failed */
#define EXIT_EXCEPTION 32 /* 32 + vector: an unexpected CPU exception */

#define HVM_START_MAGIC 0x336ec578

#define AP_TRAMP_ADDR 0x8000 /* real-mode AP trampoline page (SIPI vector 0x08) */
#define MAX_CPUS 64
#define AP_STACK_SIZE 4096

#ifndef __ASSEMBLER__

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long size_t;
typedef unsigned long uintptr_t;

#define NORETURN __attribute__((noreturn))

struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr;
	u32 memmap_entries;
	u32 reserved;
};

struct hvm_memmap_table_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
};

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* Provided by each guest. Runs at CPL0; its return value is the exit value. */
int guest_main(void);

/* Console (COM1, polled) and exit (isa-debug-exit); both work at CPL0 and CPL3. */
void rt_putc(char c);
void rt_puts(const char *s);
void rt_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
NORETURN void rt_exit(u8 value);

/* Command line: "key=value" words. The value is decimal or 0x-hex. */
const char *rt_cmdline(void);
u64 rt_arg_u64(const char *key, u64 def);

/* Memory map from the start info (RAM entries only, type 1). */
u64 rt_ram_bytes(void);

/* Time: TSC frequency calibrated against PIT channel 0 (CPL0 only). */
extern u64 rt_tsc_hz;
void rt_calibrate_tsc(void);
void rt_delay_us(u64 us);

/* Drop to CPL3 with RFLAGS.IOPL=3 (in/out allowed), IF=0, on the user stack. */
NORETURN void rt_enter_user(void (*fn)(void));

/* Load the runtime's IDT on this CPU (APs call it; rt_start does for the BSP). */
void rt_load_idt(void);

/* Assembly-side symbols (entry.S). */
NORETURN void rt_enter_user_asm(void (*fn)(void), void *stack_top);
extern u64 gdt[];
extern struct {
	u16 limit;
	u64 base;
} __attribute__((packed)) gdt_ptr;
extern u64 pml4[];
extern char boot_stack_top[];
extern char user_stack_top[];
extern char rt_exc_stubs[];

void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);

#endif /* __ASSEMBLER__ */

#endif

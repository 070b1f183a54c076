/*
 * The osvmm guest runtime in C: console, exit, command line, TSS and IDT,
 * exceptions, TSC calibration and the drop to CPL3.
 */
#include "rt.h"

#define CMDLINE_MAX 1024
#define MEMMAP_MAX 32

u64 rt_tsc_hz;

static char cmdline[CMDLINE_MAX];
static u64 ram_bytes;

struct tss64 {
	u32 reserved0;
	u64 rsp0, rsp1, rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
	u8 iomap[8192 + 1]; /* all ports allowed (0 bits), then the 0xff terminator */
} __attribute__((packed));
_Static_assert(sizeof(struct tss64) == 104 + 8193, "tss64 size");

struct idt_gate {
	u16 offset_lo;
	u16 selector;
	u8 ist;
	u8 type_attr;
	u16 offset_mid;
	u32 offset_hi;
	u32 zero;
} __attribute__((packed));
_Static_assert(sizeof(struct idt_gate) == 16, "idt_gate size");

struct exc_frame {
	u64 vector, error, rip, cs, rflags, rsp, ss;
};

static struct tss64 tss __attribute__((aligned(16)));
static struct idt_gate idt[32] __attribute__((aligned(16)));
static struct {
	u16 limit;
	u64 base;
} __attribute__((packed)) idt_ptr;

/* --- libc-free helpers gcc may call ------------------------------------ */

void *memcpy(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;
	if (d < s)
		return memcpy(dst, src, n);
	while (n--)
		d[n] = s[n];
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	u8 *d = dst;
	while (n--)
		*d++ = (u8)c;
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

/* --- console and exit -------------------------------------------------- */

void rt_putc(char c)
{
	/* Wait for THRE; bounded, so a missing UART (reads 0xff) cannot hang us. */
	for (int i = 0; i < 100000 && !(inb(COM1_LSR) & LSR_THRE); i++)
		cpu_relax();
	outb(COM1_THR, (u8)c);
}

void rt_puts(const char *s)
{
	while (*s)
		rt_putc(*s++);
}

static void put_u64(u64 v, unsigned base)
{
	char buf[24];
	int i = 0;
	do {
		unsigned d = v % base;
		buf[i++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	while (i)
		rt_putc(buf[--i]);
}

/* Conversions: %s %c %d %u %x %p %%, with an optional l/ll for 64 bits. */
void rt_printf(const char *fmt, ...)
{
	__builtin_va_list ap;
	__builtin_va_start(ap, fmt);
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			rt_putc(*fmt);
			continue;
		}
		fmt++;
		int is_long = 0;
		while (*fmt == 'l') {
			is_long = 1;
			fmt++;
		}
		switch (*fmt) {
		case 's':
			rt_puts(__builtin_va_arg(ap, const char *));
			break;
		case 'c':
			rt_putc((char)__builtin_va_arg(ap, int));
			break;
		case 'd': {
			long v = is_long ? __builtin_va_arg(ap, long) : __builtin_va_arg(ap, int);
			if (v < 0) {
				rt_putc('-');
				v = -v;
			}
			put_u64((u64)v, 10);
			break;
		}
		case 'u':
			put_u64(is_long ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 10);
			break;
		case 'x':
			put_u64(is_long ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 16);
			break;
		case 'p':
			rt_puts("0x");
			put_u64((u64)__builtin_va_arg(ap, void *), 16);
			break;
		case '%':
			rt_putc('%');
			break;
		case '\0':
			fmt--;
			break;
		default:
			rt_putc('%');
			rt_putc(*fmt);
		}
	}
	__builtin_va_end(ap);
}

static int at_cpl3(void)
{
	u16 cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	return (cs & 3) == 3;
}

NORETURN void rt_exit(u8 value)
{
	outb(DEBUG_EXIT_PORT, value);
	/* Still here: no isa-debug-exit device. Stop this CPU. */
	if (at_cpl3())
		for (;;)
			cpu_relax();
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* --- command line ------------------------------------------------------ */

const char *rt_cmdline(void) { return cmdline; }

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n'; }

static int parse_u64(const char *s, const char *end, u64 *out)
{
	u64 v = 0;
	unsigned base = 10;
	if (end - s > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (s == end)
		return -1;
	for (; s < end; s++) {
		unsigned d;
		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = *s - 'A' + 10;
		else
			return -1;
		if (v > (~0UL - d) / base)
			return -1;
		v = v * base + d;
	}
	*out = v;
	return 0;
}

u64 rt_arg_u64(const char *key, u64 def)
{
	size_t klen = 0;
	while (key[klen])
		klen++;
	const char *p = cmdline;
	while (*p) {
		while (is_space(*p))
			p++;
		const char *w = p;
		while (*p && !is_space(*p))
			p++;
		if ((size_t)(p - w) > klen && memcmp(w, key, klen) == 0 && w[klen] == '=') {
			u64 v;
			if (parse_u64(w + klen + 1, p, &v) != 0) {
				rt_printf("guest: bad value for %s= (want a number)\n", key);
				rt_exit(EXIT_BADARG);
			}
			def = v; /* the last occurrence wins */
		}
	}
	return def;
}

u64 rt_ram_bytes(void) { return ram_bytes; }

/* --- CPU tables and exceptions ----------------------------------------- */

static void set_gate(int vec, u64 handler, int dpl)
{
	struct idt_gate *g = &idt[vec];
	g->offset_lo = (u16)handler;
	g->selector = KERNEL_CS;
	g->ist = 0;
	g->type_attr = (u8)(0x8e | (dpl << 5)); /* present 64-bit interrupt gate */
	g->offset_mid = (u16)(handler >> 16);
	g->offset_hi = (u32)(handler >> 32);
	g->zero = 0;
}

void rt_load_idt(void) { __asm__ volatile("lidt %0" : : "m"(idt_ptr)); }

static void setup_cpu_tables(void)
{
	u64 base = (u64)&tss;
	u64 limit = sizeof(tss) - 1;
	tss.rsp0 = (u64)boot_stack_top;
	tss.iomap_base = 104;
	tss.iomap[8192] = 0xff;
	gdt[TSS_SEL / 8] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) |
			   (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
	gdt[TSS_SEL / 8 + 1] = base >> 32;
	__asm__ volatile("ltr %w0" : : "r"(TSS_SEL));

	for (int v = 0; v < 32; v++)
		set_gate(v, (u64)rt_exc_stubs + 16 * v, v == 3 ? 3 : 0);
	idt_ptr.limit = sizeof(idt) - 1;
	idt_ptr.base = (u64)idt;
	rt_load_idt();
}

NORETURN void rt_exception(struct exc_frame *f)
{
	rt_printf("exception %lu at 0x%lx (error 0x%lx cs 0x%lx rflags 0x%lx)\n", f->vector,
		  f->rip, f->error, f->cs, f->rflags);
	rt_exit((u8)(EXIT_EXCEPTION + f->vector));
}

/* --- time -------------------------------------------------------------- */

/*
 * Calibrate the TSC against PIT channel 0. QEMU microvm has no port-0x61
 * speaker/gate register, so the channel-2 one-shot of Linux's
 * pit_calibrate_tsc() cannot run there; channel 0 (gate always high) with
 * latched count reads works both there and under an in-kernel KVM PIT
 * (KVM_CREATE_PIT2). Mode 0 from 0xffff counts down for 55 ms; we time
 * CALIB_TICKS (40 ms) of it. Each sample brackets the count read with two
 * TSC reads and takes their middle, so the error is well under 0.1%.
 * Interrupts are off, so the IRQ0 edge at terminal count goes nowhere.
 */
#define CALIB_TICKS (PIT_HZ / 25) /* 40 ms */

static u16 pit0_count(u64 *tsc)
{
	u64 a = rdtsc();
	outb(PIT_MODE, 0x00); /* latch channel 0 */
	u8 lo = inb(PIT_CH0);
	u8 hi = inb(PIT_CH0);
	*tsc = a + (rdtsc() - a) / 2;
	return (u16)(lo | hi << 8);
}

void rt_calibrate_tsc(void)
{
	u64 t0, t1;
	outb(PIT_MODE, 0x30); /* channel 0, lobyte/hibyte, mode 0, binary */
	outb(PIT_CH0, 0xff);
	outb(PIT_CH0, 0xff);
	u16 c0 = pit0_count(&t0), c = c0;
	for (u32 polls = 0; polls < 2000000; polls++) {
		c = pit0_count(&t1);
		if (c > c0 || c0 - c >= CALIB_TICKS)
			break;
	}
	/* A missing PIT reads 0xffff forever; one that wrapped is no use either. */
	if (c > c0 || c0 - c < CALIB_TICKS || t1 - t0 < 100000) {
		rt_printf("guest: TSC calibration failed: PIT channel 0 not counting\n");
		rt_exit(EXIT_NOCLOCK);
	}
	rt_tsc_hz = (t1 - t0) * PIT_HZ / (c0 - c);
}

void rt_delay_us(u64 us)
{
	u64 t0 = rdtsc();
	u64 cycles = us * (rt_tsc_hz / 1000000);
	while (rdtsc() - t0 < cycles)
		cpu_relax();
}

/* --- CPL3 -------------------------------------------------------------- */

NORETURN void rt_enter_user(void (*fn)(void)) { rt_enter_user_asm(fn, user_stack_top); }

/* --- start ------------------------------------------------------------- */

NORETURN void rt_start(u32 start_info_paddr)
{
	const struct hvm_start_info *si = (const void *)(uintptr_t)start_info_paddr;
	if (!si || si->magic != HVM_START_MAGIC) {
		rt_puts("guest: no hvm_start_info (bad magic)\n");
		rt_exit(EXIT_NOSTART);
	}
	if (si->cmdline_paddr) {
		const char *src = (const char *)si->cmdline_paddr;
		size_t i = 0;
		while (i < CMDLINE_MAX - 1 && src[i]) {
			cmdline[i] = src[i];
			i++;
		}
		cmdline[i] = 0;
	}
	if (si->version >= 1 && si->memmap_paddr) {
		const struct hvm_memmap_table_entry *e = (const void *)si->memmap_paddr;
		for (u32 i = 0; i < si->memmap_entries && i < MEMMAP_MAX; i++)
			if (e[i].type == 1)
				ram_bytes += e[i].size;
	}
	setup_cpu_tables();
	rt_exit((u8)guest_main());
}

/*
 * Doorbell interrupts for bare-metal guests: a 256-entry IDT (the runtime's
 * 32 exception gates, then one counting handler for vectors 32..255) and the
 * local APIC software-enabled. The handler runs at CPL0 (emulated on hosts
 * without hardware virtualization: keep it short).
 */
#include "hypercall.h"

#define LAPIC_BASE 0xfee00000UL
#define LAPIC_TPR 0x80
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LVT_MASKED (1 << 16)
#define PIC1_DATA 0x21
#define PIC2_DATA 0xa1

struct gate {
	u64 lo, hi;
};

struct interrupt_frame;

volatile u64 hc_irq_count;
static struct gate idt256[256] __attribute__((aligned(16)));
static struct {
	u16 limit;
	u64 base;
} __attribute__((packed)) idt256_ptr;

static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }

__attribute__((interrupt)) static void doorbell_isr(struct interrupt_frame *frame)
{
	(void)frame;
	hc_irq_count++;
	lapic_write(LAPIC_EOI, 0);
}

void hc_irq_setup(void)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) old;
	__asm__ volatile("sidt %0" : "=m"(old));
	const struct gate *rt_idt = (const struct gate *)old.base;
	for (int v = 0; v < 32 && v * 16 < old.limit; v++)
		idt256[v] = rt_idt[v];
	u64 h = (u64)doorbell_isr;
	for (int v = 32; v < 256; v++) {
		idt256[v].lo = (h & 0xffff) | ((u64)KERNEL_CS << 16) | (0x8eUL << 40) |
			       (((h >> 16) & 0xffff) << 48);
		idt256[v].hi = h >> 32;
	}
	idt256_ptr.limit = sizeof(idt256) - 1;
	idt256_ptr.base = (u64)idt256;
	__asm__ volatile("lidt %0" : : "m"(idt256_ptr));
	/* Only doorbells: the 8259s (never programmed: their vectors would be 0..15,
	 * the CPU's exceptions) masked, and the LAPIC's LINT pins with them. */
	outb(PIC1_DATA, 0xff);
	outb(PIC2_DATA, 0xff);
	lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
	lapic_write(LAPIC_LVT_LINT1, LVT_MASKED);
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_SVR, 0x1ff); /* enabled, spurious vector 0xff */
}

/*
 * rt_enter_user with interrupts on: iretq to CPL3 with RFLAGS.IF=1 (and IOPL=3).
 * A CPL3 `sti` needs IOPL=3, which not every host's KVM keeps (a PVM host runs
 * the guest's CPL3 with IOPL=0 and honours only the TSS I/O bitmap), so the
 * interrupt flag is set by the iretq itself.
 */
NORETURN void hc_enter_user_irq(void (*fn)(void))
{
	u64 *sp = (u64 *)user_stack_top;
	*--sp = 0; /* fn's return address: none */
	__asm__ volatile("pushq %[ss]\n\t"
			 "pushq %[sp]\n\t"
			 "pushq $0x3202\n\t" /* rflags: IOPL=3, IF=1 */
			 "pushq %[cs]\n\t"
			 "pushq %[ip]\n\t"
			 "iretq"
			 :
			 : [ss] "i"(USER_DS | 3), [sp] "r"(sp), [cs] "i"(USER_CS | 3), [ip] "r"(fn)
			 : "memory");
	__builtin_unreachable();
}

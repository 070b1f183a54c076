/*
 * platform: checks the PC platform a partition's tables describe, as a kernel
 * would find it.
 *   - CPUID.01H:ECX[24]: the TSC-deadline timer is announced (the VMM's to set
 *     where KVM emulates it);
 *   - the PIT's interrupt arrives on I/O APIC pin 2, where the MADT's interrupt
 *     source override and the MP table put ISA IRQ 0: pin 2 is programmed to a
 *     vector, pin 0 is left masked, the PIT ticks at 100 Hz and the CPL3 loop
 *     counts interrupts for up to ticks=N of them (default 5) or a TSC budget.
 * Prints "platform: tsc_deadline=B" and "platform: pit on pin 2: yes" (or "no,
 * N of M interrupts"), and exits 0.
 */
#include "hypercall.h"

#define IOAPIC_BASE 0xfec00000UL
#define IOAPIC_REDTBL(pin) (0x10 + 2 * (pin))
#define LAPIC_ID 0x20
#define PIT_VECTOR 0x40

static u64 want_ticks;

static void ioapic_write(u32 reg, u32 v)
{
	*(volatile u32 *)IOAPIC_BASE = reg;
	*(volatile u32 *)(IOAPIC_BASE + 0x10) = v;
}

static void user_main(void)
{
	u32 a = 1, b, c = 0, d;
	__asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
	u64 budget = rdtsc() + 20000000000UL; /* seconds at any plausible TSC rate */
	while (hc_irq_count < want_ticks && rdtsc() < budget)
		cpu_relax();
	u64 got = hc_irq_count;
	rt_printf("platform: tsc_deadline=%u\n", (c >> 24) & 1);
	if (got >= want_ticks)
		rt_printf("platform: pit on pin 2: yes\n");
	else
		rt_printf("platform: pit on pin 2: no, %lu of %lu interrupts\n", got, want_ticks);
	rt_exit(EXIT_OK);
}

int guest_main(void)
{
	want_ticks = rt_arg_u64("ticks", 5);
	hc_irq_setup(); /* IDT for vectors 32..255, 8259s masked, LAPIC enabled */
	u32 apic_id = *(volatile u32 *)(0xfee00000UL + LAPIC_ID) >> 24;
	/* Pin 2: edge, active high, fixed delivery to this CPU; pin 0 stays masked. */
	ioapic_write(IOAPIC_REDTBL(2) + 1, apic_id << 24);
	ioapic_write(IOAPIC_REDTBL(2), PIT_VECTOR);
	/* PIT channel 0, mode 2 (rate generator), 100 Hz. */
	u16 div = PIT_HZ / 100;
	outb(PIT_MODE, 0x34);
	outb(PIT_CH0, div & 0xff);
	outb(PIT_CH0, div >> 8);
	hc_enter_user_irq(user_main);
}

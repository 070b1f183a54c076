/*
 * ticker: every vCPU counts at CPL3 while two timers interrupt the BSP, forever.
 *
 * The BSP starts the APs (INIT-SIPI-SIPI, as smp does); each CPU then counts
 * at CPL3 into TICKER_COUNTS[its APIC ID] (a little-endian u64 each). The BSP
 * takes the PIT's interrupt (I/O APIC pin 2, vector 0x40, 100 Hz) and its
 * LAPIC timer's (periodic, vector 0x41, 1e7 bus cycles: 100 Hz under KVM's
 * 1 GHz APIC bus), counted at TICKER_PIT and TICKER_LAPIC, and prints
 * "ticker: pit N lapic M" every every=K PIT ticks (default 50), N a multiple
 * of K. It first waits until no new AP has arrived for wait_ms (default 300)
 * and prints "ticker: N cpus counting". The VMM reads the counts from outside: a snapshot restored must go
 * on counting on every CPU, and both timers must keep firing. Interrupts are
 * handled at CPL0 (emulated on hosts without hardware virtualization).
 */
#include "hypercall.h"

#define TICKER_COUNTS 0x200000UL /* u64[MAX_CPUS], by APIC ID */
#define TICKER_PIT 0x200200UL
#define TICKER_LAPIC 0x200208UL

#define LAPIC_BASE 0xfee00000UL
#define LAPIC_ID 0x20
#define LAPIC_EOI 0xb0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
#define LVT_PERIODIC (1u << 17)
#define ICR_BUSY (1u << 12)
#define ICR_INIT_ALL_BUT_SELF 0x000c4500
#define ICR_SIPI_ALL_BUT_SELF 0x000c4600
#define IOAPIC_BASE 0xfec00000UL
#define IOAPIC_REDTBL(pin) (0x10 + 2 * (pin))
#define PIT_VECTOR 0x40
#define LAPIC_VECTOR 0x41
#define USER_STACK 4096

extern char ap_tramp_start[], ap_tramp_end[], ap_tramp_gdtr[];
u32 ap_slots_taken; /* slots handed out by ap_entry64 (lock xadd) */

struct gate {
	u64 lo, hi;
};
struct interrupt_frame;

static u64 every;
static u8 ap_user_stacks[MAX_CPUS][USER_STACK] __attribute__((aligned(16)));

static u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC_BASE + reg); }
static void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }

static void ioapic_write(u32 reg, u32 v)
{
	*(volatile u32 *)IOAPIC_BASE = reg;
	*(volatile u32 *)(IOAPIC_BASE + 0x10) = v;
}

__attribute__((interrupt)) static void pit_isr(struct interrupt_frame *frame)
{
	(void)frame;
	(*(volatile u64 *)TICKER_PIT)++;
	lapic_write(LAPIC_EOI, 0);
}

__attribute__((interrupt)) static void lapic_isr(struct interrupt_frame *frame)
{
	(void)frame;
	(*(volatile u64 *)TICKER_LAPIC)++;
	lapic_write(LAPIC_EOI, 0);
}

static void set_gate(int vector, void (*isr)(struct interrupt_frame *))
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) idtr;
	__asm__ volatile("sidt %0" : "=m"(idtr));
	struct gate *idt = (struct gate *)idtr.base;
	u64 h = (u64)isr;
	idt[vector].lo = (h & 0xffff) | ((u64)KERNEL_CS << 16) | (0x8eUL << 40) |
			 (((h >> 16) & 0xffff) << 48);
	idt[vector].hi = h >> 32;
}

static void count_forever(void)
{
	/* CPL3 may read the LAPIC page: the identity map has the U bit everywhere. */
	u32 id = lapic_read(LAPIC_ID) >> 24;
	volatile u64 *count = (volatile u64 *)TICKER_COUNTS + (id % MAX_CPUS);
	for (;;)
		++*count;
}

static void bsp_user(void)
{
	u32 id = lapic_read(LAPIC_ID) >> 24;
	volatile u64 *count = (volatile u64 *)TICKER_COUNTS + (id % MAX_CPUS);
	volatile u64 *pit = (volatile u64 *)TICKER_PIT;
	u64 next = every;
	for (;;) {
		++*count;
		if (*pit >= next) {
			rt_printf("ticker: pit %lu lapic %lu\n", next, *(volatile u64 *)TICKER_LAPIC);
			next += every;
		}
	}
}

void ap_main(u32 slot)
{
	rt_load_idt();
	rt_enter_user_asm(count_forever, ap_user_stacks[slot] + USER_STACK);
}

static void send_ipi(u32 icr_lo)
{
	lapic_write(LAPIC_ICR_HI, 0);
	lapic_write(LAPIC_ICR_LO, icr_lo);
	for (int i = 0; i < 1000 && (lapic_read(LAPIC_ICR_LO) & ICR_BUSY); i++)
		cpu_relax();
}

int guest_main(void)
{
	every = rt_arg_u64("every", 50);
	u64 wait_ms = rt_arg_u64("wait_ms", 300);
	if (every == 0)
		every = 1;
	rt_calibrate_tsc();
	hc_irq_setup(); /* IDT for vectors 32..255, 8259s masked, LAPIC enabled */
	set_gate(PIT_VECTOR, pit_isr);
	set_gate(LAPIC_VECTOR, lapic_isr);

	u8 *tramp = (u8 *)AP_TRAMP_ADDR;
	memcpy(tramp, ap_tramp_start, ap_tramp_end - ap_tramp_start);
	memcpy(tramp + (ap_tramp_gdtr - ap_tramp_start), &gdt_ptr, 6);
	send_ipi(ICR_INIT_ALL_BUT_SELF);
	rt_delay_us(10000);
	for (int i = 0; i < 2; i++) {
		send_ipi(ICR_SIPI_ALL_BUT_SELF | (AP_TRAMP_ADDR >> 12));
		rt_delay_us(200);
	}

	/* Wait until no AP has arrived for wait_ms (their start is emulated: slow). */
	u64 quiet = wait_ms * (rt_tsc_hz / 1000);
	u32 seen = 0;
	u64 last = rdtsc();
	while (rdtsc() - last < quiet) {
		u32 now = __atomic_load_n(&ap_slots_taken, __ATOMIC_SEQ_CST);
		if (now != seen) {
			seen = now;
			last = rdtsc();
		}
		cpu_relax();
	}

	u32 apic_id = lapic_read(LAPIC_ID) >> 24;
	ioapic_write(IOAPIC_REDTBL(2) + 1, apic_id << 24);
	ioapic_write(IOAPIC_REDTBL(2), PIT_VECTOR);
	u16 div = PIT_HZ / 100;
	outb(PIT_MODE, 0x34); /* channel 0, mode 2 (rate generator) */
	outb(PIT_CH0, div & 0xff);
	outb(PIT_CH0, div >> 8);
	lapic_write(LAPIC_TIMER_DIV, 0xb); /* divide by 1 */
	lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | LAPIC_VECTOR);
	lapic_write(LAPIC_TIMER_INIT, 10000000);
	rt_printf("ticker: %u cpus counting\n", 1 + seen);
	hc_enter_user_irq(bsp_user);
}

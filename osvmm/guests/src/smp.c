/*
 * smp: start every AP with an INIT-SIPI-SIPI broadcast through the local
 * APIC, wait until no new AP has arrived for wait_ms (default 500) of TSC
 * time, then print "cpu <apicid> online" per CPU in APIC ID order and
 * "<n> cpus online". The number of CPUs is not given to the guest.
 */
#include "rt.h"

#define LAPIC_BASE 0xfee00000UL
#define LAPIC_ID 0x20
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_BUSY (1u << 12)
#define ICR_INIT_ALL_BUT_SELF 0x000c4500 /* INIT, level assert, all excluding self */
#define ICR_SIPI_ALL_BUT_SELF 0x000c4600 /* Start-up, all excluding self */

extern char ap_tramp_start[], ap_tramp_end[], ap_tramp_gdtr[];

u32 ap_slots_taken;           /* slots handed out by ap_entry64 (lock xadd) */
static volatile u32 ap_ready; /* APs that have stored their APIC ID */
static volatile u32 ap_ids[MAX_CPUS];

static u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC_BASE + reg); }
static void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }

static void send_ipi(u32 icr_lo)
{
	lapic_write(LAPIC_ICR_HI, 0);
	lapic_write(LAPIC_ICR_LO, icr_lo);
	for (int i = 0; i < 1000 && (lapic_read(LAPIC_ICR_LO) & ICR_BUSY); i++)
		cpu_relax();
}

void ap_main(u32 slot)
{
	rt_load_idt();
	ap_ids[slot] = lapic_read(LAPIC_ID) >> 24;
	__atomic_add_fetch(&ap_ready, 1, __ATOMIC_SEQ_CST);
}

int guest_main(void)
{
	u64 wait_ms = rt_arg_u64("wait_ms", 500);
	rt_calibrate_tsc();

	/* The trampoline page and its GDT pointer (the BSP's GDT, in the image). */
	u8 *tramp = (u8 *)AP_TRAMP_ADDR;
	memcpy(tramp, ap_tramp_start, ap_tramp_end - ap_tramp_start);
	memcpy(tramp + (ap_tramp_gdtr - ap_tramp_start), &gdt_ptr, 6);

	lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x1ff); /* enable, spurious 0xff */
	u32 ids[MAX_CPUS];
	ids[0] = lapic_read(LAPIC_ID) >> 24;

	send_ipi(ICR_INIT_ALL_BUT_SELF);
	rt_delay_us(10000);
	for (int i = 0; i < 2; i++) {
		send_ipi(ICR_SIPI_ALL_BUT_SELF | (AP_TRAMP_ADDR >> 12));
		rt_delay_us(200);
	}

	/* Wait until no AP has arrived for wait_ms. */
	u64 quiet = wait_ms * (rt_tsc_hz / 1000);
	u32 seen = 0;
	u64 last = rdtsc();
	while (rdtsc() - last < quiet) {
		u32 now = ap_ready;
		if (now != seen) {
			seen = now;
			last = rdtsc();
		}
		cpu_relax();
	}
	if (seen > MAX_CPUS - 1)
		seen = MAX_CPUS - 1;

	u32 n = 1;
	for (u32 i = 0; i < seen; i++)
		ids[n++] = ap_ids[i];
	for (u32 i = 1; i < n; i++) /* insertion sort by APIC ID */
		for (u32 j = i; j > 0 && ids[j - 1] > ids[j]; j--) {
			u32 t = ids[j];
			ids[j] = ids[j - 1];
			ids[j - 1] = t;
		}
	for (u32 i = 0; i < n; i++)
		rt_printf("cpu %u online\n", ids[i]);
	rt_printf("%u cpus online\n", n);
	return EXIT_OK;
}

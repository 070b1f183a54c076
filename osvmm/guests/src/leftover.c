/*
 * leftover: looks for what an earlier boot of the same partition left behind,
 * then leaves as much as it can behind itself (osvmm up keeps a stopped
 * partition built and resets it for its next boot: nothing may survive).
 *
 * At CPL0, interrupts off throughout, it prints
 *   "leftover: memory ..."  markers in RAM (its .bss and .data, a low page, a
 *                           page at 3 MiB, a page near the top of RAM), the
 *                           kvmclock page, CPU state a boot can set (DR0, LSTAR,
 *                           SYSENTER_EIP, KERNEL_GS_BASE, PAT, a TSC far in the
 *                           future, the kvmclock MSR), a CMOS RAM byte and the
 *                           UART's scratch register;
 *   "leftover: devices ..." the PIT (read-back status of its three channels,
 *                           the gate of channel 2), both PICs (masks, pending
 *                           and in-service), the I/O APIC (a hash of its
 *                           redirection table, how many pins are unmasked),
 *                           the LAPIC (a hash of its registers; SVR, TPR, the
 *                           timer, pending and in-service vectors);
 * then programs all of it (the PIT at 1 kHz, the PICs initialized and
 * unmasked, I/O APIC pins 2 and 5, the LAPIC timer periodic, the MSRs, debug
 * registers, kvmclock, the markers), prints the devices line again as
 * "leftover: programmed ...", and at CPL3 prints "leftover: xmm5=..." and
 * "leftover: clean" or "leftover: found <what>" (every marker above and XMM5),
 * sets XMM5 and ends through the debug-exit port (value 0),
 * or with reset=1 through the reset register 0xcf9. top=ADDR (default 0x3f00000)
 * is the marker near the top of RAM.
 * A fresh partition prints the same "memory" and "devices" lines at every
 * boot; tests compare a kept partition's boots with a fresh one's.
 */
#include "rt.h"

#define MARK 0x00006c6566746f76UL /* "votfel": canonical, for LSTAR and the like */
#define LOW_ADDR 0x9800UL	  /* free: between the boot stack and the page tables */
#define MID_ADDR 0x300000UL	  /* 3 MiB: above the image */
#define KVMCLOCK_ADDR 0x310000UL

#define LAPIC_BASE 0xfee00000UL
#define IOAPIC_BASE 0xfec00000UL
#define PIC1_CMD 0x20
#define PIC1_DATA 0x21
#define PIC2_CMD 0xa0
#define PIC2_DATA 0xa1
#define PIT_CH2 0x42
#define PORT_B 0x61
#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71
#define CMOS_BYTE 0x40
#define COM1_SCR 0x3ff
#define RESET_PORT 0xcf9

#define MSR_TSC 0x10
#define MSR_SYSENTER_EIP 0x176
#define MSR_PAT 0x277
#define MSR_LSTAR 0xc0000082
#define MSR_KERNEL_GS_BASE 0xc0000102
#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01

static volatile u64 bss_mark;
static volatile u64 data_mark = 1;
static u64 top_addr, end_reset;
static int have_kvmclock;
static int found; /* leftovers reported so far on the "found" line */

static u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static void wrmsr(u32 msr, u64 v) { __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32))); }

static u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC_BASE + reg); }
static void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }

static u32 ioapic_read(u32 reg)
{
	*(volatile u32 *)IOAPIC_BASE = reg;
	return *(volatile u32 *)(IOAPIC_BASE + 0x10);
}

static void ioapic_write(u32 reg, u32 v)
{
	*(volatile u32 *)IOAPIC_BASE = reg;
	*(volatile u32 *)(IOAPIC_BASE + 0x10) = v;
}

static u32 fnv(u32 h, u32 v)
{
	for (int i = 0; i < 4; i++) {
		h ^= (v >> (8 * i)) & 0xff;
		h *= 16777619u;
	}
	return h;
}

static u8 cmos_read(u8 reg)
{
	outb(CMOS_INDEX, reg);
	return inb(CMOS_DATA);
}

static void enable_sse(void)
{
	u64 cr0, cr4;
	__asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
	cr0 = (cr0 & ~(1UL << 2)) | (1UL << 1); /* EM off, MP on */
	__asm__ volatile("mov %0, %%cr0" : : "r"(cr0));
	__asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
	cr4 |= (1UL << 9) | (1UL << 10); /* OSFXSR, OSXMMEXCPT */
	__asm__ volatile("mov %0, %%cr4" : : "r"(cr4));
}

static int kvmclock_available(void)
{
	u32 a = 0x40000000, b, c = 0, d;
	__asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
	if (b != 0x4b4d564b || c != 0x564b4d56 || d != 0x4d) /* "KVMKVMKVM" */
		return 0;
	a = 0x40000001;
	c = 0;
	__asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
	return (a >> 3) & 1; /* KVM_FEATURE_CLOCKSOURCE2 */
}

static void devices(const char *what)
{
	outb(PIT_MODE, 0xee); /* read-back: latch the status of channels 0, 1, 2 */
	u8 st0 = inb(PIT_CH0) & 0x7f, st1 = inb(PIT_CH0 + 1) & 0x7f, st2 = inb(PIT_CH2) & 0x7f;
	u8 gate = inb(PORT_B) & 3;
	outb(PIC1_CMD, 0x0a);
	u8 irr1 = inb(PIC1_CMD);
	outb(PIC2_CMD, 0x0a);
	u8 irr2 = inb(PIC2_CMD);
	outb(PIC1_CMD, 0x0b);
	u8 isr1 = inb(PIC1_CMD);
	outb(PIC2_CMD, 0x0b);
	u8 isr2 = inb(PIC2_CMD);
	u32 h = 2166136261u, unmasked = 0;
	h = fnv(h, ioapic_read(0));
	for (u32 pin = 0; pin < 24; pin++) {
		u32 lo = ioapic_read(0x10 + 2 * pin), hi = ioapic_read(0x11 + 2 * pin);
		h = fnv(fnv(h, lo), hi);
		unmasked += !(lo & (1u << 16));
	}
	u32 lh = 2166136261u, irr = 0, isr = 0;
	static const u16 regs[] = {0x20, 0x80, 0xd0, 0xe0, 0xf0, 0x280, 0x320, 0x330, 0x340,
				   0x350, 0x360, 0x370, 0x380, 0x3e0};
	for (u32 i = 0; i < sizeof(regs) / sizeof(regs[0]); i++)
		lh = fnv(lh, lapic_read(regs[i]));
	for (u32 i = 0; i < 8; i++) {
		irr |= lapic_read(0x200 + 16 * i);
		isr |= lapic_read(0x100 + 16 * i);
	}
	rt_printf("leftover: %s pit=%x,%x,%x gate=%x pic_imr=%x,%x pic_irr=%x,%x pic_isr=%x,%x "
		  "ioapic=%x unmasked=%u lapic=%x svr=%x tpr=%x lvtt=%x tmict=%x tmcct=%x "
		  "irr=%x isr=%x\n",
		  what, st0, st1, st2, gate, inb(PIC1_DATA), inb(PIC2_DATA), irr1, irr2, isr1, isr2, h,
		  unmasked, lh, lapic_read(0xf0), lapic_read(0x80), lapic_read(0x320),
		  lapic_read(0x380), lapic_read(0x390), irr, isr);
}

static void check(int cond, const char *name)
{
	if (cond)
		rt_printf("%s%s", found++ ? "," : "leftover: found ", name);
}

static void memory(void)
{
	u64 dr0;
	__asm__ volatile("mov %%dr0, %0" : "=r"(dr0));
	u64 kvmclock = have_kvmclock ? rdmsr(MSR_KVM_SYSTEM_TIME_NEW) : 0;
	u64 kvmclock_page = *(volatile u64 *)KVMCLOCK_ADDR | *(volatile u64 *)(KVMCLOCK_ADDR + 8);
	u64 tsc_far = rdtsc() >> 56; /* the last boot set the TSC to 2^60 */
	rt_printf("leftover: memory bss=%lx data=%lx low=%lx mid=%lx top=%lx kvmclock_page=%lx "
		  "dr0=%lx lstar=%lx sysenter_eip=%lx kernel_gs=%lx pat=%lx tsc_far=%lx "
		  "kvmclock=%lx cmos=%x scr=%x\n",
		  bss_mark, data_mark, *(volatile u64 *)LOW_ADDR, *(volatile u64 *)MID_ADDR,
		  *(volatile u64 *)top_addr, kvmclock_page, dr0, rdmsr(MSR_LSTAR),
		  rdmsr(MSR_SYSENTER_EIP), rdmsr(MSR_KERNEL_GS_BASE), rdmsr(MSR_PAT), tsc_far,
		  kvmclock, cmos_read(CMOS_BYTE), inb(COM1_SCR));
}

static void find_leftovers(void)
{
	u64 dr0;
	__asm__ volatile("mov %%dr0, %0" : "=r"(dr0));
	check(bss_mark != 0, "bss");
	check(data_mark != 1, "data");
	check(*(volatile u64 *)LOW_ADDR != 0, "low");
	check(*(volatile u64 *)MID_ADDR != 0, "mid");
	check(*(volatile u64 *)top_addr != 0, "top");
	check((*(volatile u64 *)KVMCLOCK_ADDR | *(volatile u64 *)(KVMCLOCK_ADDR + 8)) != 0,
	      "kvmclock_page");
	check(have_kvmclock && rdmsr(MSR_KVM_SYSTEM_TIME_NEW) != 0, "kvmclock");
	check(dr0 == MARK, "dr0");
	check(rdmsr(MSR_LSTAR) == MARK, "lstar");
	check(rdmsr(MSR_SYSENTER_EIP) == MARK, "sysenter_eip");
	check(rdmsr(MSR_KERNEL_GS_BASE) == MARK, "kernel_gs");
	check(rdmsr(MSR_PAT) == 0x0007010600070106UL, "pat");
	check((rdtsc() >> 56) != 0, "tsc");
	check(cmos_read(CMOS_BYTE) == 0xa5, "cmos");
	check(inb(COM1_SCR) == 0x5a, "scr");
}

static void leave_everything_behind(void)
{
	u64 mark = MARK;
	/* Memory. */
	bss_mark = mark;
	data_mark = mark;
	*(volatile u64 *)LOW_ADDR = mark;
	*(volatile u64 *)MID_ADDR = mark;
	*(volatile u64 *)top_addr = mark;
	/* CPU registers and MSRs (XMM5 at CPL3: this host cannot emulate SSE at CPL0). */
	__asm__ volatile("mov %0, %%dr0" : : "r"(mark));
	wrmsr(MSR_LSTAR, mark);
	wrmsr(MSR_SYSENTER_EIP, mark);
	wrmsr(MSR_KERNEL_GS_BASE, mark);
	wrmsr(MSR_PAT, 0x0007010600070106UL);
	if (have_kvmclock)
		wrmsr(MSR_KVM_SYSTEM_TIME_NEW, KVMCLOCK_ADDR | 1);
	/* PIT: channel 0 at 1 kHz (mode 2), channel 2 a square wave with its gate on. */
	u16 div = PIT_HZ / 1000;
	outb(PIT_MODE, 0x34);
	outb(PIT_CH0, div & 0xff);
	outb(PIT_CH0, div >> 8);
	outb(PIT_MODE, 0xb6);
	outb(PIT_CH2, 0x10);
	outb(PIT_CH2, 0x00);
	outb(PORT_B, (inb(PORT_B) & ~2) | 1);
	/* PICs: initialized at vectors 0x20 and 0x28, IRQ 0 and 4 unmasked. */
	outb(PIC1_CMD, 0x11);
	outb(PIC2_CMD, 0x11);
	outb(PIC1_DATA, 0x20);
	outb(PIC2_DATA, 0x28);
	outb(PIC1_DATA, 4);
	outb(PIC2_DATA, 2);
	outb(PIC1_DATA, 1);
	outb(PIC2_DATA, 1);
	outb(PIC1_DATA, 0xee);
	outb(PIC2_DATA, 0xfe);
	/* I/O APIC: pin 2 (the PIT) to vector 0x40, pin 5 level-triggered to 0x45. */
	u32 apic_id = lapic_read(0x20) >> 24;
	ioapic_write(0x10 + 2 * 2 + 1, apic_id << 24);
	ioapic_write(0x10 + 2 * 2, 0x40);
	ioapic_write(0x10 + 2 * 5 + 1, apic_id << 24);
	ioapic_write(0x10 + 2 * 5, 0x45 | (1u << 15));
	/* LAPIC: enabled, TPR raised, the timer periodic at vector 0x50 (IF stays 0:
	 * its interrupts stay pending). */
	lapic_write(0xf0, 0x1ff);
	lapic_write(0x80, 0x20);
	lapic_write(0x3e0, 0xb);
	lapic_write(0x320, 0x50 | (1u << 17));
	lapic_write(0x380, 100000);
	/* Devices of the VMM: a CMOS RAM byte, the UART's scratch register. */
	outb(CMOS_INDEX, CMOS_BYTE);
	outb(CMOS_DATA, 0xa5);
	outb(COM1_SCR, 0x5a);
	/* Last, so that the output above was not slowed: a TSC far in the future. */
	wrmsr(MSR_TSC, 1UL << 60);
}

/* CPL3, where SSE runs natively: XMM5, then the end of the boot. */
static void user_main(void)
{
	u64 xmm5, mark = MARK;
	__asm__ volatile("movq %%xmm5, %0" : "=r"(xmm5));
	rt_printf("leftover: xmm5=%lx\n", xmm5);
	check(xmm5 == MARK, "xmm5");
	rt_printf(found ? "\n" : "leftover: clean\n");
	__asm__ volatile("movq %0, %%xmm5" : : "r"(mark));
	if (end_reset) {
		outb(RESET_PORT, 0x06); /* RST_CPU | SYS_RST */
		for (;;)
			cpu_relax();
	}
	rt_exit(EXIT_OK);
}

int guest_main(void)
{
	top_addr = rt_arg_u64("top", 0x3f00000);
	end_reset = rt_arg_u64("reset", 0);
	have_kvmclock = kvmclock_available();
	enable_sse();
	memory();
	devices("devices");
	find_leftovers();
	leave_everything_behind();
	devices("programmed");
	rt_enter_user(user_main);
}

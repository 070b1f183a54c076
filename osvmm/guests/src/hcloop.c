/*
 * hcloop: iters=N (default 100000) round trips to the VMM from CPL3, timed
 * with the TSC: port=0 (default) makes N hypercalls (CONSOLE_WRITE of 0 bytes:
 * every check, no effect); port=1 makes N `outb` to port 0x80 instead, the
 * bare port-I/O exit that the hypercall is measured against. Prints
 * "hcloop: N calls, T ns each, last result R".
 * port=2 makes both, interleaved in blocks of block=B (default 500) so that a
 * busy host slows both alike, and prints the hypercall line, then
 * "hcloop: N bare exits, T ns each".
 * call=1 makes the hypercalls PARTITION_INFO into a 64-byte buffer instead (an
 * effect: the answer written into the guest's memory).
 */
#include "hypercall.h"

static u64 iters, mode, block, which;
static u64 info[8];

static void bare_exits(u64 n)
{
	if (n)
		__asm__ volatile("1: outb %%al, $0x80\n\t"
				 "dec %0\n\t"
				 "jnz 1b"
				 : "+c"(n)
				 : "a"(0)
				 : "memory");
}

static long hypercalls(u64 n)
{
	long r = 0;
	if (which == 1)
		for (; n; n--)
			r = hc_call(HC_PARTITION_INFO, (u64)info, sizeof(info), 0, 0);
	else
		for (; n; n--)
			r = hc_call(HC_CONSOLE_WRITE, 0x100000, 0, 0, 0);
	return r;
}

static u64 ns_each(u64 cycles, u64 n) { return n ? cycles * 1000 / (rt_tsc_hz / 1000000) / n : 0; }

static void user_main(void)
{
	long r = 0;
	u64 hc_cycles = 0, bare_cycles = 0, t0;
	if (mode == 2) {
		for (u64 done = 0; done < iters; done += block) {
			u64 n = iters - done < block ? iters - done : block;
			t0 = rdtsc();
			r = hypercalls(n);
			hc_cycles += rdtsc() - t0;
			t0 = rdtsc();
			bare_exits(n);
			bare_cycles += rdtsc() - t0;
		}
	} else {
		t0 = rdtsc();
		if (mode)
			bare_exits(iters);
		else
			r = hypercalls(iters);
		hc_cycles = rdtsc() - t0;
	}
	rt_printf("hcloop: %lu calls, %lu ns each, last result %ld\n", iters, ns_each(hc_cycles, iters),
		  r);
	if (mode == 2)
		rt_printf("hcloop: %lu bare exits, %lu ns each\n", iters, ns_each(bare_cycles, iters));
	rt_exit(EXIT_OK);
}

int guest_main(void)
{
	iters = rt_arg_u64("iters", 100000);
	mode = rt_arg_u64("port", 0);
	block = rt_arg_u64("block", 500);
	which = rt_arg_u64("call", 0);
	if (!block)
		block = 1;
	rt_calibrate_tsc();
	rt_enter_user(user_main);
}

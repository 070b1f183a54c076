/*
 * hcloop: iters=N (default 100000) round trips to the VMM from CPL3, timed
 * with the TSC: port=0 (default) makes N hypercalls (CONSOLE_WRITE of 0 bytes:
 * every check, no effect); port=1 makes N `outb` to port 0x80 instead, the
 * bare port-I/O exit that the hypercall is measured against. Prints
 * "hcloop: N calls, T ns each, last result R".
 */
#include "hypercall.h"

static u64 iters, bare;

static void user_main(void)
{
	u64 n = iters;
	long r = 0;
	u64 t0 = rdtsc();
	if (bare)
		__asm__ volatile("1: outb %%al, $0x80\n\t"
				 "dec %0\n\t"
				 "jnz 1b"
				 : "+c"(n)
				 : "a"(0)
				 : "memory");
	else
		for (; n; n--)
			r = hc_call(HC_CONSOLE_WRITE, 0x100000, 0, 0, 0);
	u64 t = rdtsc() - t0;
	rt_printf("hcloop: %lu calls, %lu ns each, last result %ld\n", iters,
		  iters ? t * 1000 / (rt_tsc_hz / 1000000) / iters : 0, r);
	rt_exit(EXIT_OK);
}

int guest_main(void)
{
	iters = rt_arg_u64("iters", 100000);
	bare = rt_arg_u64("port", 0);
	rt_calibrate_tsc();
	rt_enter_user(user_main);
}

/*
 * compute: a dependent multiply-add loop at CPL3 (native speed) for
 * seconds=S (default 1) of wall time, or ms=M milliseconds when given;
 * then "compute: N iterations/s". Wall time is the TSC, calibrated against
 * PIT channel 0 at CPL0 before dropping to CPL3.
 */
#include "rt.h"

#define CHUNK (1UL << 20)

static u64 run_ms;

/* CHUNK iterations of x = x * 6364136223846793005 + 1; each needs the last. */
static u64 chunk(u64 x)
{
	u64 n = CHUNK;
	__asm__ volatile("1: imul %2, %0\n\t"
			 "inc %0\n\t"
			 "dec %1\n\t"
			 "jnz 1b"
			 : "+r"(x), "+r"(n)
			 : "r"(6364136223846793005UL));
	return x;
}

static void user_main(void)
{
	u64 want = run_ms * (rt_tsc_hz / 1000);
	u64 x = 1, n = 0, t0 = rdtsc(), t; /* the asm is volatile: x need not be used */
	do {
		x = chunk(x);
		n += CHUNK;
		t = rdtsc();
	} while (t - t0 < want);
	u64 us = (t - t0) * 1000 / (rt_tsc_hz / 1000);
	if (us == 0)
		us = 1;
	rt_printf("compute: %lu iterations/s\n", n * 1000000 / us);
	rt_exit(EXIT_OK);
}

int guest_main(void)
{
	run_ms = rt_arg_u64("seconds", 1) * 1000;
	run_ms = rt_arg_u64("ms", run_ms);
	rt_calibrate_tsc();
	rt_enter_user(user_main);
}

/*
 * memtouch: rewrite every page of a memory range, pass after pass, at CPL3,
 * checking each page on the way: a self-check of snapshots and migrations.
 *
 * The range is mib=N MiB (default 16) from MEMTOUCH_BASE (4 MiB). In pass k
 * (from 1) the first u64 of every page must hold k - 1 (0: never written) and
 * is set to k; the pass number is kept at MEMTOUCH_PASS. A page that holds
 * anything else was lost by whoever moved the memory: the guest prints
 * "memtouch: page 0xADDR holds A, expected B" and exits 1. Between passes it
 * waits wait_us=U microseconds of TSC time (default 0), and prints
 * "memtouch: pass K ok" every every=E passes (default 10). Runs until stopped,
 * or exits 0 after limit=L passes (default 0: never).
 */
#include "rt.h"

#define MEMTOUCH_PASS 0x200000UL
#define MEMTOUCH_BASE 0x400000UL
#define PAGE 4096UL

static u64 pages, wait_ticks, every, limit;

static void user_main(void)
{
	volatile u64 *pass = (volatile u64 *)MEMTOUCH_PASS;
	for (u64 k = *pass + 1;; k++) {
		for (u64 i = 0; i < pages; i++) {
			volatile u64 *p = (volatile u64 *)(MEMTOUCH_BASE + i * PAGE);
			if (*p != k - 1) {
				rt_printf("memtouch: page %#lx holds %lu, expected %lu\n",
					  MEMTOUCH_BASE + i * PAGE, *p, k - 1);
				rt_exit(EXIT_FAIL);
			}
			*p = k;
		}
		*pass = k;
		if (k % every == 0)
			rt_printf("memtouch: pass %lu ok\n", k);
		if (limit && k >= limit)
			rt_exit(EXIT_OK);
		u64 until = rdtsc() + wait_ticks;
		while (rdtsc() < until)
			cpu_relax();
	}
}

int guest_main(void)
{
	u64 mib = rt_arg_u64("mib", 16);
	pages = mib * (1UL << 20) / PAGE;
	if (MEMTOUCH_BASE + pages * PAGE > rt_ram_bytes()) {
		rt_printf("memtouch: %lu MiB from 4 MiB do not fit in RAM\n", mib);
		return EXIT_BADARG;
	}
	every = rt_arg_u64("every", 10);
	if (every == 0)
		every = 1;
	limit = rt_arg_u64("limit", 0);
	u64 wait_us = rt_arg_u64("wait_us", 0);
	if (wait_us) {
		rt_calibrate_tsc();
		wait_ticks = wait_us * (rt_tsc_hz / 1000000);
	}
	rt_enter_user(user_main);
}

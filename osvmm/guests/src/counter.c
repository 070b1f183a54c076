/*
 * counter: count at CPL3 in its own memory, forever (or to limit=N).
 *
 * At CPL3 it first fills PATTERN_SIZE bytes at PATTERN_ADDR with a fixed
 * pattern (byte i = i * 7 + 1), then stores the running count at
 * COUNTER_ADDR (a little-endian u64) on every iteration and prints
 * "counter: N" every every=N iterations (default 2^28). The VMM reads both
 * from outside (GuestMemory.read): the count must keep rising and the
 * pattern never change, whatever other partitions do. Needs 4 MiB of RAM.
 * limit=N (default 0: never) exits 0 after N iterations.
 */
#include "rt.h"

#define COUNTER_ADDR 0x200000UL
#define PATTERN_ADDR 0x201000UL
#define PATTERN_SIZE 0x10000UL

static u64 every, limit;

static void user_main(void)
{
	volatile u64 *counter = (volatile u64 *)COUNTER_ADDR;
	u8 *pattern = (u8 *)PATTERN_ADDR;
	for (u64 i = 0; i < PATTERN_SIZE; i++)
		pattern[i] = (u8)(i * 7 + 1);
	u64 n = 0;
	for (;;) {
		*counter = ++n;
		if (n % every == 0)
			rt_printf("counter: %lu\n", n);
		if (limit && n >= limit)
			rt_exit(EXIT_OK);
	}
}

int guest_main(void)
{
	every = rt_arg_u64("every", 1UL << 28);
	if (every == 0)
		every = 1;
	limit = rt_arg_u64("limit", 0);
	rt_enter_user(user_main);
}

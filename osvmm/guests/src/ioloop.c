/*
 * ioloop: iters=N (default 100000) `outb` to port 0x80 from CPL3, each one a
 * port-I/O exit; then "ioloop: N done". Timing iters=0 against iters=N gives
 * the cost of one exit.
 */
#include "rt.h"

static u64 iters;

static void user_main(void)
{
	u64 n = iters;
	if (n)
		__asm__ volatile("1: outb %%al, $0x80\n\t"
				 "dec %0\n\t"
				 "jnz 1b"
				 : "+c"(n)
				 : "a"(0)
				 : "memory");
	rt_printf("ioloop: %lu done\n", iters);
	rt_exit(EXIT_OK);
}

int guest_main(void)
{
	iters = rt_arg_u64("iters", 100000);
	rt_enter_user(user_main);
}

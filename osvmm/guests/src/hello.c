/*
 * hello: print one line from CPL3, exit 0.
 * fault=1: then execute ud2 at CPL3, to exercise the exception path
 * ("exception 6 at ..." and debug-exit 32 + 6).
 */
#include "rt.h"

static u64 fault;

static void user_main(void)
{
	rt_puts("Hello from osvmm guest\n");
	if (fault)
		__asm__ volatile("ud2");
	rt_exit(EXIT_OK);
}

int guest_main(void)
{
	fault = rt_arg_u64("fault", 0);
	rt_enter_user(user_main);
}

/* hello: print one line from CPL3, exit 0. */
#include "rt.h"

static void user_main(void)
{
	rt_puts("Hello from osvmm guest\n");
	rt_exit(EXIT_OK);
}

int guest_main(void) { rt_enter_user(user_main); }

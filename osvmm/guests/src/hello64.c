/* hello64: entered by the osvmm 64-bit entry (entry64, no PVH note); prints from CPL3. */
#include "rt.h"

static void user_main(void)
{
	rt_puts("Hello from osvmm guest (64-bit entry)\n");
	rt_exit(EXIT_OK);
}

int guest_main(void) { rt_enter_user(user_main); }

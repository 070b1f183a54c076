/* triplefault: print a line, then triple-fault on purpose (empty IDT + ud2). */
#include "rt.h"

int guest_main(void)
{
	static const struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) empty_idt = {0, 0};

	rt_puts("triplefault: about to fault\n");
	/* #UD finds no gate -> #GP finds none -> #DF finds none -> shutdown. */
	__asm__ volatile("lidt %0\n\tud2" : : "m"(empty_idt));
	return EXIT_FAIL; /* not reached */
}

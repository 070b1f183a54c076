/*
 * intruder: a partition with no grants tries to reach a channel and a peer.
 *   chan=ID (default 0) peer=ID (default 0) gpa=ADDR (default the window start)
 * At CPL3 it tries to attach the channel (rw and read-only), ring the peer,
 * detach, stop the peer, attach a channel that does not exist, and write and
 * read the channel's slot directly; prints every result on one line.
 */
#include "hypercall.h"

static void user_main(void)
{
	u64 chan = rt_arg_u64("chan", 0), peer = rt_arg_u64("peer", 0);
	u64 gpa = rt_arg_u64("gpa", 0xd0000000UL);
	long attach = hc_attach(chan, 0);
	long attach_ro = hc_attach(chan, HC_ATTACH_READONLY);
	long ring = hc_doorbell(peer, 0, 0x40);
	long detach = hc_detach(chan);
	long stop = hc_call(HC_PARTITION_CONTROL, peer, HC_OP_STOP, 0, 0);
	long missing = hc_attach(99, 0);
	volatile u64 *p = (volatile u64 *)gpa;
	*p = 0x1badc0de1badc0deUL; /* no memslot there: an MMIO write the VMM drops */
	u64 back = *p;
	rt_printf("intruder: attach=%ld attach_ro=%ld ring=%ld detach=%ld stop=%ld missing=%ld "
		  "readback=0x%lx\n",
		  attach, attach_ro, ring, detach, stop, missing, back);
	rt_exit(EXIT_OK);
}

int guest_main(void) { rt_enter_user(user_main); }

/*
 * hcinfo: at CPL3, PARTITION_INFO into a buffer, printed on COM1 field by
 * field, then one line through CONSOLE_WRITE and the results of a few calls
 * that must fail (a misaligned buffer, a short one, an unknown call).
 * attach=ID (optional): then attach channel ID (flags=F, default 0), read its
 * first word, write value=V there, read it back, detach; prints the four.
 */
#include "hypercall.h"

static u64 buf[512];

static void user_main(void)
{
	long n = hc_call(HC_PARTITION_INFO, (u64)buf, sizeof(buf), 0, 0);
	const struct hc_info *h = (const void *)buf;
	rt_printf("hcinfo: info=%ld abi=%u id=%u vcpus=%u memory=0x%lx flags=%u channels=%u "
		  "doorbells=0x%lx\n",
		  n, h->abi_version, h->partition_id, h->vcpu_count, h->memory_size, h->flags,
		  h->channel_count, h->doorbell_mask);
	const struct hc_info_channel *c = (const void *)(h + 1);
	for (u32 i = 0; n > 0 && i < h->channel_count; i++)
		rt_printf("hcinfo: channel %u flags=%u gpa=0x%lx size=0x%lx\n", c[i].channel_id,
			  c[i].flags, c[i].gpa, c[i].size);
	long w = hc_console("hello through the hypercall console\n");
	long mis = hc_call(HC_PARTITION_INFO, (u64)buf + 4, 64, 0, 0);
	long shrt = hc_call(HC_PARTITION_INFO, (u64)buf, 8, 0, 0);
	long unk = hc_call(6, 0, 0, 0, 0);
	long far = hc_call(HC_CONSOLE_WRITE, 0xd0000000UL, 8, 0, 0);
	rt_printf("hcinfo: console=%ld misaligned=%ld short=%ld unknown=%ld outside=%ld\n", w, mis,
		  shrt, unk, far);
	u64 chan = rt_arg_u64("attach", ~0UL);
	if (chan != ~0UL) {
		long gpa = hc_attach(chan, rt_arg_u64("flags", 0));
		u64 before = 0, after = 0;
		if (gpa > 0) {
			volatile u64 *p = (volatile u64 *)gpa;
			before = *p;
			*p = rt_arg_u64("value", 0x5157);
			after = *p;
		}
		rt_printf("hcinfo: attach=0x%lx before=0x%lx after=0x%lx detach=%ld\n", gpa, before,
			  after, hc_detach(chan));
	}
	rt_exit(EXIT_OK);
}

int guest_main(void) { rt_enter_user(user_main); }

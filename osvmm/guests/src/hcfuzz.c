/*
 * hcfuzz: count=N (default 100000) hypercalls from CPL3 with random call
 * numbers and arguments: seed=S seeds a xorshift64* generator. Arguments
 * mix full-range random values with the boundary values of the ABI (0,
 * 2^63, 2^64-1, small ids, vectors, addresses in its own RAM, at its edges,
 * in the channel window, at the LAPIC). It never asks to shut itself down
 * or reboot (those calls would end the run); prints a summary by result.
 */
#include "hypercall.h"

static u64 state, self_id, ram_end;
static u8 scratch[3 * 4096] __attribute__((aligned(4096)));

static u64 rnd(void)
{
	state ^= state >> 12;
	state ^= state << 25;
	state ^= state >> 27;
	return state * 0x2545F4914F6CDD1DUL;
}

static u64 pick(void)
{
	u64 r = rnd(), low = r >> 8;
	switch (r & 15) {
	case 0:
	case 1:
		return rnd();
	case 2:
		return 0;
	case 3:
		return ~0UL;
	case 4:
		return 1UL << 63;
	case 5:
		return 0xd0000000UL + (low & 0x3fff);
	case 6:
		return (u64)scratch + (low & 0x1fff);
	case 7:
		return 0xfee00000UL;
	case 8:
		return ram_end - (low & 0x1fff);
	case 9:
		return 32 + (low & 0xff) - 8;
	case 10:
		return 1UL << 32;
	case 11:
		return 4096 + (low & 1);
	default:
		return low & 7;
	}
}

static u64 count, ok, skipped, errs[64];

static void user_main(void)
{
	static u64 info[512];
	hc_call(HC_PARTITION_INFO, (u64)info, sizeof(info), 0, 0);
	const struct hc_info *h = (const void *)info;
	self_id = h->partition_id;
	ram_end = h->memory_size < 0xc0000000UL ? h->memory_size : 0xc0000000UL;
	for (u64 i = 0; i < count; i++) {
		u64 r = rnd();
		u64 nr = (r & 15) == 15 ? (rnd() & 0xffffffffUL) : (r & 7);
		u64 a0 = pick(), a1 = pick(), a2 = pick(), a3 = pick();
		if (nr == HC_PARTITION_CONTROL && a0 == self_id && a1 <= HC_OP_REBOOT) {
			skipped++;
			continue;
		}
		long res = hc_call(nr, a0, a1, a2, a3);
		if (res >= 0)
			ok++;
		else if (-res < 64)
			errs[-res]++;
		else
			errs[0]++;
	}
	rt_printf("hcfuzz: calls=%lu ok=%lu skipped=%lu", count - skipped, ok, skipped);
	for (int e = 0; e < 64; e++)
		if (errs[e])
			rt_printf(" e%d=%lu", e, errs[e]);
	rt_printf("\n");
	rt_exit(EXIT_OK);
}

int guest_main(void)
{
	state = rt_arg_u64("seed", 1) | 1;
	count = rt_arg_u64("count", 100000);
	rt_enter_user(user_main);
}

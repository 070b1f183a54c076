/*
 * wmkernel: a "kernel" with protected data and a "driver", for the write
 * monitor (docs/write-monitor.md). Everything runs at CPL3 (hot loops must).
 *
 * The driver's code is the section .text.driver (__driver_start..__driver_end,
 * guest.ld); the rest of .text (_text.._etext) is the kernel. The data the
 * VMM is told to protect lies at 0x400000 (the tests' plan, wmkernel.py):
 *
 *   protected   0x400000..0x400800, 0x400900..0x402800
 *   unprotected 0x400800..0x400900 (a hole on a protected page),
 *               0x402800..0x403000, and the pages around them
 *   driver may write  0x400100..0x400110, 0x401ff8..0x402008 (across a page)
 *   kernel may write  0x400200..0x400400, 0x402100..0x402200
 *
 * mode=legit (default): the kernel and the driver write every word they may
 *   (plain stores, 8-byte stores across a page, rep stos), read them back,
 *   print "wmkernel: legit ok" (or the first word that did not stick, exit 1).
 * mode=wild count=N seed=S: legit, then the driver makes N wild writes into
 *   0x3ff000..0x404000 from a splitmix64 stream (kind, address, value): byte,
 *   word, dword and qword stores, rep stosb, rep stosl, rep movsb, and qword
 *   stores just below a permission boundary; prints "wmkernel: wild N done".
 *   tests/wmkernel.py replays the same stream.
 * mode=loop iters=N target=A [port=1]: N dword stores to A (or N outb to port
 *   0x80) in a CPL3 loop timed by the TSC: "wmkernel: loop N, T ns each".
 * mode=work iters=N every=K target=A: N iterations of an LCG step, a dword
 *   store to A every K: "wmkernel: work N every K, T us".
 */
#include "rt.h"

#define WIN_START 0x3ff000UL
#define WIN_END 0x404000UL

extern char __driver_start[], __driver_end[], _text[], _etext[];

static u64 mode_wild, mode_loop, mode_work, count, seed, iters, every, target, use_port;
static u64 rng_state;
static u8 srcbuf[64];

static inline __attribute__((always_inline)) u64 rnd(void)
{
	u64 z = (rng_state += 0x9e3779b97f4a7c15UL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
	return z ^ (z >> 31);
}

static const u64 boundaries[] = {
	0x400000, 0x400100, 0x400110, 0x400200, 0x400400, 0x400800, 0x400900, 0x401000,
	0x401ff8, 0x402000, 0x402008, 0x402100, 0x402200, 0x402800, 0x403000,
};

/* -- the driver -------------------------------------------------------------- */

#define DRIVER __attribute__((noinline, section(".text.driver")))

DRIVER static void driver_legit(void)
{
	for (u64 a = 0x400100; a < 0x400110; a += 4)
		*(volatile u32 *)a = (u32)(0xd0000000 ^ a);
	*(volatile u64 *)0x401ff8 = 0xd0000000d0401ff8UL; /* last words of page 1 */
	*(volatile u64 *)0x401ffc = 0xd0402000d0401ffcUL; /* across the page boundary */
	*(volatile u32 *)0x402004 = 0xd0402004;
}

DRIVER static void driver_wild(u64 n)
{
	for (u64 i = 0; i < n; i++) {
		u64 kind = rnd() % 8;
		u64 addr = WIN_START + rnd() % (WIN_END - WIN_START);
		u64 value = rnd();
		u64 len;
		switch (kind) {
		case 0:
			if (addr > WIN_END - 1)
				addr = WIN_END - 1;
			*(volatile u8 *)addr = (u8)value;
			break;
		case 1:
			if (addr > WIN_END - 2)
				addr = WIN_END - 2;
			*(volatile u16 *)addr = (u16)value;
			break;
		case 2:
			if (addr > WIN_END - 4)
				addr = WIN_END - 4;
			*(volatile u32 *)addr = (u32)value;
			break;
		case 3:
			if (addr > WIN_END - 8)
				addr = WIN_END - 8;
			*(volatile u64 *)addr = value;
			break;
		case 4:
			len = 1 + rnd() % 16;
			if (addr > WIN_END - len)
				addr = WIN_END - len;
			__asm__ volatile("rep stosb" : "+D"(addr), "+c"(len) : "a"(value) : "memory");
			break;
		case 5:
			len = 1 + rnd() % 8;
			if (addr > WIN_END - 4 * len)
				addr = WIN_END - 4 * len;
			__asm__ volatile("rep stosl" : "+D"(addr), "+c"(len) : "a"(value) : "memory");
			break;
		case 6: {
			len = 1 + rnd() % 16;
			u64 src = (u64)&srcbuf[rnd() % 32];
			if (addr > WIN_END - len)
				addr = WIN_END - len;
			__asm__ volatile("rep movsb" : "+D"(addr), "+S"(src), "+c"(len) : : "memory");
			break;
		}
		default:
			addr = boundaries[rnd() % (sizeof(boundaries) / sizeof(boundaries[0]))];
			addr -= 1 + rnd() % 7;
			*(volatile u64 *)addr = value;
		}
	}
}

/* -- the kernel -------------------------------------------------------------- */

static int check(u64 a, u32 want)
{
	u32 got = *(volatile u32 *)a;
	if (got != want) {
		rt_printf("wmkernel: legit FAILED: %lx holds %x, want %x\n", a, got, want);
		return 0;
	}
	return 1;
}

static int legit(void)
{
	for (u64 a = 0x400200; a < 0x400400; a += 4)
		*(volatile u32 *)a = (u32)(0x4b000000 ^ a);
	u64 dst = 0x402100, n = 0x40;
	__asm__ volatile("rep stosl" : "+D"(dst), "+c"(n) : "a"(0x4b402100U) : "memory");
	*(volatile u64 *)0x4021f8 = 0x4b4021fc4b4021f8UL;
	*(volatile u32 *)0x400800 = 0x11223344; /* the hole: unprotected */
	*(volatile u32 *)0x402ffc = 0x55667788; /* unprotected words on page 2 */
	*(volatile u32 *)0x403000 = 0x99aabbcc; /* an unprotected page */
	driver_legit();
	int ok = 1;
	for (u64 a = 0x400200; a < 0x400400; a += 4)
		ok &= check(a, (u32)(0x4b000000 ^ a));
	for (u64 a = 0x402100; a < 0x4021f8; a += 4)
		ok &= check(a, 0x4b402100);
	ok &= check(0x4021f8, 0x4b4021f8) & check(0x4021fc, 0x4b4021fc);
	ok &= check(0x400800, 0x11223344) & check(0x402ffc, 0x55667788);
	ok &= check(0x403000, 0x99aabbcc);
	for (u64 a = 0x400100; a < 0x400110; a += 4)
		ok &= check(a, (u32)(0xd0000000 ^ a));
	for (u64 a = 0x401ff8; a < 0x402008; a += 4)
		ok &= check(a, (u32)(0xd0000000 ^ a));
	return ok;
}

static void loop(void)
{
	u64 n = iters;
	u64 t0 = rdtsc();
	if (use_port)
		__asm__ volatile("1: outb %%al, $0x80\n\tdec %0\n\tjnz 1b" : "+c"(n) : "a"(0) : "memory");
	else
		for (; n; n--)
			*(volatile u32 *)target = (u32)n;
	u64 t = rdtsc() - t0;
	rt_printf("wmkernel: loop %lu, %lu ns each\n", iters,
		  iters ? t * 1000 / (rt_tsc_hz / 1000000) / iters : 0);
}

static void work(void)
{
	u64 x = 1;
	u64 t0 = rdtsc();
	for (u64 i = 1; i <= iters; i++) {
		x = x * 6364136223846793005UL + 1442695040888963407UL;
		if (i % every == 0)
			*(volatile u32 *)target = (u32)x;
	}
	u64 t = rdtsc() - t0;
	rt_printf("wmkernel: work %lu every %lu, %lu us (%lx)\n", iters, every,
		  t / (rt_tsc_hz / 1000000), x & 0xff);
}

static void user_main(void)
{
	if (mode_loop)
		loop();
	else if (mode_work)
		work();
	else {
		if (!legit())
			rt_exit(EXIT_FAIL);
		rt_printf("wmkernel: legit ok (driver %lx..%lx, kernel %lx..%lx)\n",
			  (u64)__driver_start, (u64)__driver_end, (u64)_text, (u64)_etext);
		if (mode_wild) {
			rng_state = seed;
			for (u64 i = 0; i < sizeof(srcbuf); i += 8)
				*(u64 *)&srcbuf[i] = rnd();
			driver_wild(count);
			rt_printf("wmkernel: wild %lu done\n", count);
		}
	}
	rt_exit(EXIT_OK);
}

int guest_main(void)
{
	const char *cmd = rt_cmdline();
	/* mode=legit|wild|loop|work: the value's first letter is enough here. */
	for (const char *p = cmd; *p; p++) {
		if ((p == cmd || p[-1] == ' ') && p[0] == 'm' && p[1] == 'o' && p[2] == 'd' &&
		    p[3] == 'e' && p[4] == '=') {
			mode_wild = p[5] == 'w' && p[6] == 'i';
			mode_loop = p[5] == 'l' && p[6] == 'o';
			mode_work = p[5] == 'w' && p[6] == 'o';
		}
	}
	count = rt_arg_u64("count", 1000);
	seed = rt_arg_u64("seed", 1);
	iters = rt_arg_u64("iters", 100000);
	every = rt_arg_u64("every", 1000);
	if (!every)
		every = 1;
	target = rt_arg_u64("target", 0x400200);
	use_port = rt_arg_u64("port", 0);
	if (mode_loop || mode_work)
		rt_calibrate_tsc();
	rt_enter_user(user_main);
}

/*
 * The osvmm hypercalls from a bare-metal guest (docs/hypercalls.md).
 *
 * A hypercall is `out dx, eax` with DX = 0x510, EAX = the call number,
 * a0..a3 in RDI, RSI, RBX, RCX; the result comes back in RAX (>= 0, or a
 * negative errno). It works at CPL0 and at CPL3 (the runtime sets IOPL=3).
 *
 * Doorbells: hc_irq_setup() (CPL0) gives the CPU an IDT whose vectors 32..255
 * all count into hc_irq_count and EOI the local APIC, and software-enables
 * the LAPIC; hc_enter_user_irq(fn) then drops to CPL3 with interrupts on
 * (RFLAGS.IF set by the iretq: a CPL3 `sti` faults where the host does not
 * keep IOPL=3). hcirq.c implements both.
 */
#ifndef OSVMM_GUEST_HYPERCALL_H
#define OSVMM_GUEST_HYPERCALL_H

#include "rt.h"

#define HC_PORT 0x510

#define HC_PARTITION_INFO 0
#define HC_CONSOLE_WRITE 1
#define HC_DOORBELL 2
#define HC_CHANNEL_ATTACH 3
#define HC_CHANNEL_DETACH 4
#define HC_PARTITION_CONTROL 5

#define HC_ATTACH_READONLY 1

#define HC_OP_SHUTDOWN 0
#define HC_OP_REBOOT 1
#define HC_OP_STOP 2
#define HC_OP_START 3
#define HC_OP_RESTART 4

/* Linux errno values, as the ABI fixes them. */
#define HC_EPERM 1
#define HC_ENOENT 2
#define HC_ESRCH 3
#define HC_EFAULT 14
#define HC_EBUSY 16
#define HC_EINVAL 22
#define HC_ENOSPC 28
#define HC_ENOSYS 38

struct hc_info {
	u32 abi_version;
	u32 length;
	u32 partition_id;
	u32 vcpu_count;
	u64 memory_size;
	u32 flags; /* bit 0 privileged */
	u32 channel_count;
	u64 doorbell_mask;
};
_Static_assert(sizeof(struct hc_info) == 40, "hc_info size");

struct hc_info_channel {
	u32 channel_id;
	u32 flags; /* bit 0 rw granted, bit 1 attached */
	u64 gpa;
	u64 size;
};
_Static_assert(sizeof(struct hc_info_channel) == 24, "hc_info_channel size");

static inline long hc_call(u64 nr, u64 a0, u64 a1, u64 a2, u64 a3)
{
	u64 rax = nr;
	__asm__ volatile("outl %%eax, %%dx"
			 : "+a"(rax)
			 : "d"((u16)HC_PORT), "D"(a0), "S"(a1), "b"(a2), "c"(a3)
			 : "memory");
	return (long)rax;
}

static inline long hc_console(const char *s)
{
	u64 n = 0;
	while (s[n])
		n++;
	return hc_call(HC_CONSOLE_WRITE, (u64)s, n, 0, 0);
}

static inline long hc_attach(u64 channel, u64 flags)
{
	return hc_call(HC_CHANNEL_ATTACH, channel, flags, 0, 0);
}

static inline long hc_detach(u64 channel) { return hc_call(HC_CHANNEL_DETACH, channel, 0, 0, 0); }

static inline long hc_doorbell(u64 partition, u64 vcpu, u64 vector)
{
	return hc_call(HC_DOORBELL, partition, vcpu, vector, 0);
}

static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* hcirq.c */
extern volatile u64 hc_irq_count;
void hc_irq_setup(void);
NORETURN void hc_enter_user_irq(void (*fn)(void));

#endif

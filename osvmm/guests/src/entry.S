/*
 * Entry code of the osvmm guest runtime: PVH 32-bit entry, osvmm 64-bit
 * entry, the GDT, the identity-mapped page tables, stacks, exception stubs
 * and the drop to CPL3.
 *
 * Both entries end in long_entry (64-bit, CPL0, own GDT and page tables),
 * which calls rt_start(start_info_paddr).
 */
#include "rt.h"

#define MSR_EFER 0xc0000080
#define EFER_LME 0x100
#define CR0_PE 0x1
#define CR0_PG 0x80000000
#define CR4_PAE 0x20

	.section .text.entry, "ax"

/*
 * PVH entry (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode, paging off,
 * flat segments, %ebx = guest-physical address of struct hvm_start_info.
 */
	.code32
	.globl pvh_entry
pvh_entry:
	cli
	cld
	movl %ebx, rt_start_info_paddr
	lgdtl gdt_ptr
	ljmpl $KERNEL_CS32, $1f
1:	movl $KERNEL_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movl %cr4, %eax
	orl $CR4_PAE, %eax
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	orl $(CR0_PG | CR0_PE), %eax
	movl %eax, %cr0
	ljmpl $KERNEL_CS, $long_entry

	.code64
long_entry:
	movl $KERNEL_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	leaq boot_stack_top(%rip), %rsp
	movl rt_start_info_paddr(%rip), %edi
	call rt_start
2:	cli
	hlt
	jmp 2b

/*
 * osvmm 64-bit entry: long mode, paging on (the VMM's identity map), CS=0x10,
 * DS=ES=SS=0x18, %rbx = guest-physical address of struct hvm_start_info.
 * Switch to our own GDT and page tables (both identity maps, so the code
 * keeps running), then join the PVH path.
 */
	.globl entry64
entry64:
	cli
	cld
	movl %ebx, rt_start_info_paddr(%rip)
	lgdt gdt_ptr(%rip)
	leaq pml4(%rip), %rax
	movq %rax, %cr3
	leaq boot_stack_top(%rip), %rsp
	pushq $KERNEL_CS
	leaq long_entry(%rip), %rax
	pushq %rax
	lretq

	.text
/* void rt_enter_user_asm(void (*fn)(void), void *stack_top): iretq to CPL3. */
	.globl rt_enter_user_asm
rt_enter_user_asm:
	subq $8, %rsi
	movq $0, (%rsi)			/* fn's return address: none */
	pushq $(USER_DS | 3)		/* ss */
	pushq %rsi			/* rsp */
	pushq $0x3002			/* rflags: IOPL=3, IF=0 */
	pushq $(USER_CS | 3)		/* cs */
	pushq %rdi			/* rip */
	iretq

/* Exception stubs, 16 bytes apart: push an error code where the CPU does not. */
	.macro EXC_NOERR n
	.balign 16
	pushq $0
	pushq $\n
	jmp exc_common
	.endm
	.macro EXC_ERR n
	.balign 16
	pushq $\n
	jmp exc_common
	.endm

	.balign 16
	.globl rt_exc_stubs
rt_exc_stubs:
	EXC_NOERR 0
	EXC_NOERR 1
	EXC_NOERR 2
	EXC_NOERR 3
	EXC_NOERR 4
	EXC_NOERR 5
	EXC_NOERR 6
	EXC_NOERR 7
	EXC_ERR 8
	EXC_NOERR 9
	EXC_ERR 10
	EXC_ERR 11
	EXC_ERR 12
	EXC_ERR 13
	EXC_ERR 14
	EXC_NOERR 15
	EXC_NOERR 16
	EXC_ERR 17
	EXC_NOERR 18
	EXC_NOERR 19
	EXC_NOERR 20
	EXC_ERR 21
	EXC_NOERR 22
	EXC_NOERR 23
	EXC_NOERR 24
	EXC_NOERR 25
	EXC_NOERR 26
	EXC_NOERR 27
	EXC_NOERR 28
	EXC_ERR 29
	EXC_ERR 30
	EXC_NOERR 31

exc_common:
	/* Stack: vector, error code, rip, cs, rflags, rsp, ss. */
	movq %rsp, %rdi
	andq $-16, %rsp
	call rt_exception
3:	cli
	hlt
	jmp 3b

	.data
	.balign 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff	/* 0x08 kernel code, 32-bit */
	.quad 0x00af9a000000ffff	/* 0x10 kernel code, 64-bit */
	.quad 0x00cf92000000ffff	/* 0x18 kernel data */
	.quad 0x00cff2000000ffff	/* 0x20 user data (DPL 3) */
	.quad 0x00affa000000ffff	/* 0x28 user code, 64-bit (DPL 3) */
	.quad 0, 0			/* 0x30 64-bit TSS, filled in by rt_start */
gdt_end:
	.globl gdt_ptr
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt

	.globl rt_start_info_paddr
rt_start_info_paddr:
	.long 0

/*
 * Identity map of the first 4 GiB with 2 MiB pages, all present, writable
 * and user-accessible; the top GiB (MMIO hole: LAPIC, IOAPIC) uncached.
 */
	.section .data.pagetables, "aw"
	.balign 4096
	.globl pml4
pml4:
	.quad pdpt + 0x7
	.fill 511, 8, 0
pdpt:
	.quad pd + 0x0000 + 0x7
	.quad pd + 0x1000 + 0x7
	.quad pd + 0x2000 + 0x7
	.quad pd + 0x3000 + 0x7
	.fill 508, 8, 0
pd:
	.set addr, 0
	.rept 1536
	.quad addr + 0x87		/* P | RW | US | PS */
	.set addr, addr + 0x200000
	.endr
	.rept 512
	.quad addr + 0x9f		/* P | RW | US | PWT | PCD | PS */
	.set addr, addr + 0x200000
	.endr

	.section .bss
	.balign 4096
	.space 16384
	.globl boot_stack_top
boot_stack_top:
	.space 16384
	.globl user_stack_top
user_stack_top:

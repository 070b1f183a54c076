/*
 * AP trampoline of the smp guest. smp.c copies [ap_tramp_start, ap_tramp_end)
 * to AP_TRAMP_ADDR (0x8000) and fills in ap_tramp_gdtr; a SIPI with vector
 * 0x08 starts each AP there in real mode with CS=0x0800, IP=0.
 * The AP enters protected mode, then long mode with the BSP's page tables,
 * takes a stack slot and calls ap_main(slot).
 */
#include "rt.h"

#define MSR_EFER 0xc0000080

	.section .rodata.tramp, "a"
	.code16
	.globl ap_tramp_start
ap_tramp_start:
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds
	lgdtl (ap_tramp_gdtr - ap_tramp_start)
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $KERNEL_CS32, $(AP_TRAMP_ADDR + tramp32 - ap_tramp_start)

	.code32
tramp32:
	movl $KERNEL_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %cr4, %eax
	orl $0x20, %eax			/* PAE */
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $0x100, %eax		/* LME */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax		/* PG | PE */
	movl %eax, %cr0
	ljmpl $KERNEL_CS, $ap_entry64

	.balign 8
	.globl ap_tramp_gdtr
ap_tramp_gdtr:
	.word 0
	.long 0
	.globl ap_tramp_end
ap_tramp_end:

	.text
	.code64
ap_entry64:
	movl $KERNEL_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl $1, %eax
	lock xaddl %eax, ap_slots_taken(%rip)
	cmpl $(MAX_CPUS - 1), %eax
	jae 2f
	movl %eax, %edi
	movl %eax, %ecx
	incq %rcx
	shlq $12, %rcx			/* AP_STACK_SIZE */
	leaq ap_stacks(%rip), %rsp
	addq %rcx, %rsp
	call ap_main
2:	cli
	hlt
	jmp 2b

	.bss
	.balign 4096
ap_stacks:
	.space (MAX_CPUS - 1) * AP_STACK_SIZE

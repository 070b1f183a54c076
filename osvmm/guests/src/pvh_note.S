/*
 * The PVH boot note: XEN_ELFNOTE_PHYS32_ENTRY (type 18, name "Xen"), whose
 * descriptor is the 32-bit entry point. Like Linux's vmlinux, the descriptor
 * is 8 bytes: QEMU reads a 64-bit value from the note of an ELF64 image.
 * The note segment is 4-byte aligned (QEMU pads the name to p_align).
 */
	.section .note.Xen, "a", @note
	.balign 4
	.long 2f - 1f		/* namesz */
	.long 4f - 3f		/* descsz */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
1:	.asciz "Xen"
2:	.balign 4
3:	.quad pvh_entry
4:	.balign 4

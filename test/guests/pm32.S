/* Flat 32-bit protected mode, paging off: store a marker through ds, read it back and
 * report it on port 0x515, then exit via port 0x501. */
	.code32
	.text
	.globl _start
_start:
	movl	$0x600dc0de, 0x180000
	movl	0x180000, %eax
	mov	$0x515, %dx
	outl	%eax, %dx
	mov	$0x501, %dx
	outb	%al, %dx
1:	jmp	1b

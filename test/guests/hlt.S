/* Ring 0: one hlt, then exit via port 0x501. */
	.code64
	.text
	.globl _start
_start:
	hlt
after_hlt:
	mov	$0x501, %dx
	outb	%al, %dx
1:	jmp	1b

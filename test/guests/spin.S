/* Counts in rax until the byte at rdi becomes non-zero, then reports the count on port
 * 0x515 (low half) and exits via port 0x501. */
	.code64
	.text
	.globl _start
_start:
	xor	%eax, %eax
	.globl spin_loop
spin_loop:
	inc	%rax
	cmpb	$0, (%rdi)
	je	spin_loop
	.globl spin_end
spin_end:
	mov	$0x515, %dx
	outl	%eax, %dx
	mov	$0x501, %dx
	outb	%al, %dx
1:	jmp	1b

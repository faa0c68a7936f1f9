/* Writes "hello from ring 3\n" byte by byte to COM1, then exits via port 0x501. */
	.code64
	.text
	.globl _start
_start:
	lea	msg(%rip), %rsi
	mov	$0x3f8, %dx
1:	lodsb
	test	%al, %al
	jz	2f
	outb	%al, %dx
	jmp	1b
2:	mov	$0x501, %dx
	xor	%eax, %eax
	outb	%al, %dx
3:	jmp	3b
msg:	.asciz	"hello from ring 3\n"

/* String I/O: rep insw of 4 words from port 0x512 into 0x190000, then rep outsb of a
 * message to port 0x3f8, then exit via port 0x501. */
	.code64
	.text
	.globl _start
_start:
	cld
	mov	$0x190000, %edi
	mov	$0x512, %dx
	mov	$4, %ecx
	rep insw
	lea	msg(%rip), %rsi
	mov	$0x3f8, %dx
	mov	$(msg_end - msg), %ecx
	rep outsb
	mov	$0x501, %dx
	outb	%al, %dx
1:	jmp	1b
msg:	.ascii	"rep!"
msg_end:

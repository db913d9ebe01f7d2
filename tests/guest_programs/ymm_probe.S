# ymm_probe: a static x86_64 guest program (no libc) for tests/platform.rs. It loads a known
# 512-byte pattern into ymm0..ymm15 and then spins, comparing all sixteen registers with the
# pattern on every iteration, so the values live in the vCPU's registers (not in a saved task
# context) whenever the VM is paused for a snapshot. Paths are relative to its working directory:
#   ymm-ready   created once the registers hold the pattern;
#   ymm-stop    when it appears (looked for every 2^14 iterations), one last check, then exit 0.
# Exit status 1 at the first register that differs from the pattern.
# Built by the test with `cc -nostdlib -static -o ymm_probe ymm_probe.S`.

    .text
    .globl _start
_start:
    vmovdqu pattern+0(%rip), %ymm0
    vmovdqu pattern+32(%rip), %ymm1
    vmovdqu pattern+64(%rip), %ymm2
    vmovdqu pattern+96(%rip), %ymm3
    vmovdqu pattern+128(%rip), %ymm4
    vmovdqu pattern+160(%rip), %ymm5
    vmovdqu pattern+192(%rip), %ymm6
    vmovdqu pattern+224(%rip), %ymm7
    vmovdqu pattern+256(%rip), %ymm8
    vmovdqu pattern+288(%rip), %ymm9
    vmovdqu pattern+320(%rip), %ymm10
    vmovdqu pattern+352(%rip), %ymm11
    vmovdqu pattern+384(%rip), %ymm12
    vmovdqu pattern+416(%rip), %ymm13
    vmovdqu pattern+448(%rip), %ymm14
    vmovdqu pattern+480(%rip), %ymm15
    call check

    # open("ymm-ready", O_WRONLY | O_CREAT, 0644), then close it.
    mov $2, %eax
    lea ready(%rip), %rdi
    mov $0x41, %esi
    mov $0644, %edx
    syscall
    test %eax, %eax
    js fail
    mov %eax, %edi
    mov $3, %eax
    syscall

    xor %r12d, %r12d
spin:
    call check
    inc %r12
    test $0x3fff, %r12
    jnz spin
    # access("ymm-stop", F_OK)
    mov $21, %eax
    lea stop(%rip), %rdi
    xor %esi, %esi
    syscall
    test %eax, %eax
    jnz spin
    call check
    mov $60, %eax
    xor %edi, %edi
    syscall

fail:
    mov $60, %eax
    mov $1, %edi
    syscall

# Stores ymm0..ymm15 and compares them with the pattern; exits through `fail` on a difference.
check:
    lea seen(%rip), %rdi
    vmovdqu %ymm0, 0(%rdi)
    vmovdqu %ymm1, 32(%rdi)
    vmovdqu %ymm2, 64(%rdi)
    vmovdqu %ymm3, 96(%rdi)
    vmovdqu %ymm4, 128(%rdi)
    vmovdqu %ymm5, 160(%rdi)
    vmovdqu %ymm6, 192(%rdi)
    vmovdqu %ymm7, 224(%rdi)
    vmovdqu %ymm8, 256(%rdi)
    vmovdqu %ymm9, 288(%rdi)
    vmovdqu %ymm10, 320(%rdi)
    vmovdqu %ymm11, 352(%rdi)
    vmovdqu %ymm12, 384(%rdi)
    vmovdqu %ymm13, 416(%rdi)
    vmovdqu %ymm14, 448(%rdi)
    vmovdqu %ymm15, 480(%rdi)
    lea pattern(%rip), %rsi
    mov $512, %ecx
    cld
    repe cmpsb
    jne fail
    ret

    .section .rodata
ready: .asciz "ymm-ready"
stop:  .asciz "ymm-stop"
# 512 bytes, no two 32-byte rows alike and no zero byte (a register restored as zeros, or only
# its low 128 bits, differs from it).
pattern:
    .set i, 0
    .rept 512
    .byte ((i * 37 + 11) % 255) + 1
    .set i, i + 1
    .endr

    .bss
seen: .zero 512

    .section .note.GNU-stack, "", @progbits

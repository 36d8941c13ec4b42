#include "textflag.h"
#include "start_amd64.h"

// The idle shim's whole program, for x86-64 Linux. It is never called from Go: Image copies these
// instructions, up to the end marker, into a tiny ELF executable. They run with no Go runtime, use
// no data but the stack, and jump only relative to themselves, so they run at any address.
//
// On entry the stack is the kernel's: 0(SP) argc, then argv, NULL, envp, NULL. The descriptors of
// the registration (CONN below), of the shim's executable (EXE, O_PATH) and of the port's
// listening socket (LISTEN; -1 when there is none) are immediates that Executable patches in:
// 0x3c3c3c3c, 0x4d4d4d4d and 0x5b5b5b5b here, loaded into R14, R15 and BX. SIGINT and SIGTERM
// are blocked. The fast start (start_amd64.s) jumps here instead of exec'ing a copy: with SP at
// a block laid out as the kernel's, the descriptors already in R14, R15 and BX, and its mark in R8.
//
//	block SIGINT and SIGTERM (again); unless started by the fast start: load the descriptors and
//	  take the shim's name (prctl PR_SET_NAME)
//	sfd = signalfd4(-1, {SIGINT, SIGTERM}, 8, SFD_CLOEXEC|SFD_NONBLOCK)
//	wait: ppoll({CONN, POLLIN|POLLRDHUP}, {sfd, POLLIN}, {LISTEN, POLLIN}) until something happens
//	a stop signal: a log line saying so (as the shim in Go logs it), then shutdown(CONN, SHUT_WR)
//	  (the deregistration); wait up to 400 ms for the server to close (read to EOF); exit 0
//	anything else (the server went away or said something, or a connection reached the port's
//	  socket because Envoy is away or not there yet): unless a stop signal is pending,
//	  execveat(EXE, "", argv, envp, AT_EMPTY_PATH): the shim, resumed, re-registers or serves the
//	  connection
TEXT ·image(SB), NOSPLIT|NOFRAME, $0-0
	MOVQ SP, R12             // R12: the kernel's stack (argc, argv, envp)
	SUBQ $1024, SP
	ANDQ $-16, SP
	// 0(SP): sigset; 16(SP): three pollfds; 40(SP): "" ; 48(SP): timespec; 64(SP): read buffer;
	// 640(SP): the log line
	MOVQ $0x4002, AX         // 1<<(SIGINT-1) | 1<<(SIGTERM-1)
	MOVQ AX, 0(SP)
	MOVQ $0, DI              // SIG_BLOCK: they are already, when Enter ran the program
	MOVQ SP, SI
	XORQ DX, DX
	MOVQ $8, R10
	MOVQ $14, AX             // rt_sigprocmask
	SYSCALL
	MOVQ $startMark, AX
	CMPQ R8, AX
	JEQ  held                // the fast start: the descriptors are in their registers, the name is right
	MOVL $0x3c3c3c3c, R14    // CONN
	MOVL $0x4d4d4d4d, R15    // EXE
	MOVQ $0x5b5b5b5b, BX     // LISTEN (sign-extended: -1 stays -1)
	// prctl(PR_SET_NAME, NAME): run through a descriptor, the process is named after its
	// number; it keeps the shim's name (NAME: 16 bytes, patched in like the descriptors).
	MOVQ $0x6e6e6e6e6e6e6e6e, AX // NAME[0:8]
	MOVQ AX, 64(SP)
	MOVQ $0x6f6f6f6f6f6f6f6f, AX // NAME[8:16]
	MOVQ AX, 72(SP)
	MOVQ $15, DI             // PR_SET_NAME
	LEAQ 64(SP), SI
	MOVQ $157, AX            // prctl
	SYSCALL

held:
	MOVQ $-1, DI
	MOVQ SP, SI
	MOVQ $8, DX
	MOVQ $0x80800, R10       // SFD_CLOEXEC | SFD_NONBLOCK
	MOVQ $289, AX            // signalfd4
	SYSCALL
	CMPQ AX, $0
	JLT  exec                // cannot watch for signals: the shim, resumed, holds in Go
	MOVQ AX, R13             // R13: the signalfd
	MOVL R14, 16(SP)         // CONN
	MOVL $0x2001, 20(SP)     // POLLIN | POLLRDHUP, revents 0
	MOVL R13, 24(SP)
	MOVL $1, 28(SP)          // POLLIN, revents 0
	MOVL BX, 32(SP)          // LISTEN (-1: ppoll skips it)
	MOVL $1, 36(SP)          // POLLIN, revents 0

wait:
	LEAQ 16(SP), DI
	MOVQ $3, SI
	XORQ DX, DX              // no timeout
	XORQ R10, R10            // no signal mask
	MOVQ $8, R8
	MOVQ $271, AX            // ppoll
	SYSCALL
	CMPQ AX, $-4             // EINTR (a stop/continue)
	JEQ  wait
	MOVWLZX 30(SP), AX       // the signalfd's revents
	TESTL AX, AX
	JNE  stop

	// The registration changed, or a connection waits on the port's socket. A stop signal that came meanwhile is ours to handle: the Go
	// runtime would die of it before the shim could ask for it.
	MOVQ R13, DI
	LEAQ 64(SP), SI
	MOVQ $128, DX            // sizeof(struct signalfd_siginfo)
	MOVQ $0, AX              // read
	SYSCALL
	CMPQ AX, $0
	JGT  deregister

exec:
	MOVQ $0, 40(SP)
	MOVQ R15, DI             // EXE
	LEAQ 40(SP), SI          // ""
	LEAQ 8(R12), DX          // argv
	MOVQ 0(R12), AX          // argc
	LEAQ 16(R12)(AX*8), R10  // envp: after argv's NULL
	MOVQ $0x1000, R8         // AT_EMPTY_PATH
	MOVQ $322, AX            // execveat
	SYSCALL
	// The shim cannot be run again: exit, which ends the registration, so the server withdraws
	// the port rather than keeping one nobody holds.
	MOVQ $1, DI
	JMP  exit

stop:
	MOVQ R13, DI
	LEAQ 64(SP), SI
	MOVQ $128, DX
	MOVQ $0, AX              // read: take the signal
	SYSCALL

deregister:
	// Say why, as the shim in Go would: a log line, "msg=stopping signal=interrupt" (or
	// "terminated": the signal's number is at the start of what the signalfd gave).
	MOVQ $0x4e493d6c6576656c, AX
	MOVQ AX, 640(SP)
	MOVQ $0x617373656d264f46, AX
	MOVQ AX, 648(SP)
	MOVQ $0x332567736d3d6567, AX
	MOVQ AX, 656(SP)
	MOVQ $0x6e6970706f747344, AX
	MOVQ AX, 664(SP)
	MOVQ $0x6c616e6769732b67, AX
	MOVQ AX, 672(SP)
	MOVQ $0x0000000000443325, AX
	MOVQ AX, 680(SP)
	MOVL 64(SP), AX
	CMPL AX, $15             // SIGTERM
	JEQ  terminated
	MOVQ $0x7075727265746e69, AX
	MOVQ AX, 683(SP)
	MOVQ $0x6c3d657079742674, AX
	MOVQ AX, 691(SP)
	MOVQ $0x000000000000676f, AX
	MOVQ AX, 699(SP)
	MOVQ $61, DX
	JMP  say
terminated:
	MOVQ $0x74616e696d726574, AX
	MOVQ AX, 683(SP)
	MOVQ $0x3d65707974266465, AX
	MOVQ AX, 691(SP)
	MOVQ $0x0000000000676f6c, AX
	MOVQ AX, 699(SP)
	MOVQ $62, DX
say:
	MOVQ R14, DI             // CONN
	LEAQ 640(SP), SI
	MOVQ $0x4040, R10        // MSG_NOSIGNAL | MSG_DONTWAIT
	XORQ R8, R8
	XORQ R9, R9
	MOVQ $44, AX             // sendto
	SYSCALL
	MOVQ R14, DI             // CONN
	MOVQ $1, SI              // SHUT_WR
	MOVQ $48, AX             // shutdown
	SYSCALL
	MOVQ $0, 48(SP)          // 400 ms in all: ppoll leaves the remaining time in the timespec
	MOVQ $400000000, 56(SP)
	MOVL $-1, 24(SP)         // poll the registration only

drain:
	LEAQ 16(SP), DI
	MOVQ $2, SI
	LEAQ 48(SP), DX
	XORQ R10, R10
	MOVQ $8, R8
	MOVQ $271, AX            // ppoll
	SYSCALL
	CMPQ AX, $-4
	JEQ  drain
	CMPQ AX, $0
	JLE  done                // timed out, or failed
	MOVQ R14, DI             // CONN
	LEAQ 64(SP), SI
	MOVQ $512, DX
	MOVQ $0, AX              // read
	SYSCALL
	CMPQ AX, $0
	JGT  drain               // a message before the end: keep reading

done:
	MOVQ $0, DI

exit:
	MOVQ $231, AX            // exit_group
	SYSCALL
	// The end marker: Image copies up to here.
	BYTE $0x45; BYTE $0x44; BYTE $0x53; BYTE $0x2d; BYTE $0x49; BYTE $0x44; BYTE $0x4c; BYTE $0x45
	BYTE $0x2d; BYTE $0x45; BYTE $0x4e; BYTE $0x44; BYTE $0x2d; BYTE $0x2d; BYTE $0x2d; BYTE $0x21

// func imageText() []byte
TEXT ·imageText(SB), NOSPLIT, $0-24
	LEAQ ·image(SB), AX
	MOVQ AX, ret_base+0(FP)
	MOVQ $4096, ret_len+8(FP)
	MOVQ $4096, ret_cap+16(FP)
	RET

// func stopHandlerPC() uintptr
TEXT ·stopHandlerPC(SB), NOSPLIT, $0-8
	LEAQ ·stopHandler(SB), AX
	MOVQ AX, ret+0(FP)
	RET

// stopHandler is the stop signals' handler while Enter replaces the process (see holdStops): it
// blocks the signal in the thread that took it, from its return on (in the mask the kernel
// restores then, uc_sigmask in the ucontext at DX), and sends it to the process again, where it
// waits for a thread that does not block it yet, or, once none is left, for the idle program.
// Called by the kernel: DI the signal, SI its siginfo, DX the ucontext; it returns to the
// restorer, which restores every register.
TEXT ·stopHandler(SB), NOSPLIT|NOFRAME, $0
	ORQ  $0x4002, 296(DX)    // uc_sigmask |= SIGINT, SIGTERM
	MOVQ DI, R12
	MOVQ $39, AX             // getpid
	SYSCALL
	MOVQ AX, DI
	MOVQ R12, SI
	MOVQ $62, AX             // kill(getpid(), sig)
	SYSCALL
	RET

// func blockHandlerPC() uintptr
TEXT ·blockHandlerPC(SB), NOSPLIT, $0-8
	LEAQ ·blockHandler(SB), AX
	MOVQ AX, ret+0(FP)
	RET

// blockHandler is blockSignal's handler while Enter replaces the process (see holdAllThreads): it
// blocks the stop signals in the thread it runs in, from its return on, and counts it in
// threadsHeld.
TEXT ·blockHandler(SB), NOSPLIT|NOFRAME, $0
	ORQ  $0x4002, 296(DX)    // uc_sigmask |= SIGINT, SIGTERM
	LOCK
	INCL ·threadsHeld(SB)
	RET

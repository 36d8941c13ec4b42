#include "textflag.h"
#include "start_amd64.h"

// The fast start: the shim's entry point (linker flag -E=_rt0_envoy_docker_shim; see Start). It
// runs before the Go runtime and does, for the one common case, all a TCP shim does before
// dockerd hears "0\n": no Go runtime is started for it, which is most of a Go proxy's start-up.
// For anything else it jumps to the Go runtime's own entry with the process as the kernel made it.
//
//	dockerd's exact argv for TCP, an fd 3 that is a pipe, no EDS_SHIM_ setting but the socket's;
//	  else: the Go runtime
//	block SIGINT and SIGTERM, watched on a signalfd; ignore SIGPIPE
//	the port's socket: fd 4 (-use-listen-fd: a listening TCP socket on the host port) with
//	  SO_REUSEPORT; or bind one as handover.Listen does (IPv4, or IPv6 :: and ::1)
//	register: connect to the server's socket, send Open (serving, wants_served), wait up to 2 s
//	  for the answer, or a stop signal (then "1\n<stopped>" on fd 3, exit 0)
//	"type=ready": descriptors of the registration, the port's socket and the shim's executable
//	  at 100 or above (as idle.Enter keeps them), "0\n" on fd 3, then the idle program with
//	  them, and an environment for the shim it may run again (ResumeEnv, RetryWindowEnv,
//	  GOMAXPROCS=1)
//	anything else (Failed, no server, a timeout, a bind error): undo, then the Go runtime, which
//	  registers again and reports what went wrong in its words, within the same deadline
//	  (StartedEnv)
//
// Registers: R12 the kernel's stack; BX the signalfd, R14 the registration, R15 the socket this
// code bound (-1: none); R13 flags. Helpers take and return values in registers (see each).
//
// The scratch below the kernel's stack is laid out so that an idle shim keeps two pages of it:
// the variables and the message out in the first; the answer in (16 KiB, of which the kernel
// fills what the server sent) from the middle of it; the block the idle program or the Go
// runtime takes for the kernel's, which overwrites the answer once it is read, from the second.
// The idle program's own 1 KiB goes below the block, over the message out. The Go runtime's stack
// grows down from the block too: what it must read is above the block.

#define SCRATCH 131072
#define SIGSET 0
#define POLLFDS 16
#define TIMESPEC 32
#define OPTVAL 48
#define OPTLEN 52
#define STATBUF 64
#define SADDR 256
#define GOTADDR 384
#define GOTLEN 512
#define KACT 528
#define RETRYENV 576
#define RESUMEENV 640
#define SOCKPTR 704
#define SOCKLEN 712
#define HOSTPORT 720
#define ENVC 728
#define HASRETRY 736
#define KEPTCONN 744
#define KEPTLISTEN 752
#define KEPTEXE 760
#define STARTNS 776
#define STARTENV 784    // where the StartedEnv string is
#define OUTLEN 768
#define OUT 1024
#define IN 2048
#define INSIZE 16384
#define BLOCK 3968
#define MAXENV 12000

#define FLAG_FD4 1
#define FLAG_HOST6 2
#define FLAG_CONTAINER6 4

#define ARGV(i) (8+8*(i))(R12)

TEXT _rt0_envoy_docker_shim(SB), NOSPLIT|NOFRAME, $0
	MOVQ SP, R12
	SUBQ $SCRATCH, SP
	ANDQ $-4096, SP
	ADDQ $128, SP            // the helpers' return addresses land in the same page as the rest
	MOVQ $-1, BX
	MOVQ $-1, R14
	MOVQ $-1, R15
	XORQ R13, R13
	XORQ DI, DI              // CLOCK_REALTIME: the Go shim, if it takes over, counts its deadline from here
	LEAQ TIMESPEC(SP), SI
	MOVQ $228, AX            // clock_gettime
	SYSCALL
	MOVQ (TIMESPEC+0)(SP), AX
	IMULQ $1000000000, AX
	ADDQ (TIMESPEC+8)(SP), AX
	MOVQ AX, STARTNS(SP)

	// argv: exactly dockerd's: startFlags[i] at argv[startFlagAt[i]], the last with 12 only.
	MOVQ 0(R12), AX
	MOVQ $6, R9              // how many flags to look at
	CMPQ AX, $11
	JEQ  flags
	CMPQ AX, $12
	JNE  goruntime
	ORQ  $FLAG_FD4, R13
	MOVQ $7, R9
flags:
	XORQ R8, R8
flag:
	LEAQ ·startFlagAt(SB), SI
	MOVQ (SI)(R8*8), AX
	MOVQ 8(R12)(AX*8), DI
	MOVQ R8, AX
	SHLQ $4, AX              // a string header is 16 bytes
	LEAQ ·startFlags(SB), SI
	ADDQ AX, SI
	CALL startArgIs<>(SB)
	TESTQ AX, AX
	JEQ  goruntime
	INCQ R8
	CMPQ R8, R9
	JLT  flag

	// The values: addresses of hex digits, dots and colons; ports 1-65535.
	MOVQ ARGV(4), SI
	CALL startAddress<>(SB)
	CMPQ AX, $0
	JEQ  goruntime
	CMPQ CX, $0
	JEQ  host4
	ORQ  $FLAG_HOST6, R13
host4:
	MOVQ ARGV(8), SI
	CALL startAddress<>(SB)
	CMPQ AX, $0
	JEQ  goruntime
	CMPQ CX, $0
	JEQ  container4
	ORQ  $FLAG_CONTAINER6, R13
container4:
	MOVQ ARGV(6), SI
	CALL startPort<>(SB)
	CMPQ AX, $0
	JLE  goruntime
	MOVQ AX, HOSTPORT(SP)
	MOVQ ARGV(10), SI
	CALL startPort<>(SB)
	CMPQ AX, $0
	JLE  goruntime

	// The environment: no EDS_SHIM_ setting but the socket's.
	MOVQ ·startSocket+0(SB), AX
	MOVQ AX, SOCKPTR(SP)
	MOVQ ·startSocket+8(SB), AX
	MOVQ AX, SOCKLEN(SP)
	MOVQ $0, ENVC(SP)
	MOVQ 0(R12), AX
	LEAQ 16(R12)(AX*8), R8
env:
	MOVQ 0(R8), DI
	TESTQ DI, DI
	JEQ  envdone
	INCQ ENVC(SP)
	CMPQ ENVC(SP), $MAXENV
	JGT  goruntime
	LEAQ ·startEnvPrefix(SB), SI
	CALL startHasPrefix<>(SB)
	TESTQ AX, AX
	JEQ  nextenv
	MOVQ 0(R8), DI
	LEAQ ·startSocketEnv(SB), SI
	CALL startHasPrefix<>(SB)
	TESTQ AX, AX
	JEQ  goruntime           // a setting only the Go shim reads
	MOVQ 0(R8), DI
	ADDQ ·startSocketEnv+8(SB), DI
	MOVQ DI, SOCKPTR(SP)
	CALL startStrlen<>(SB)
	CMPQ AX, $1
	JLT  goruntime
	CMPQ AX, $107            // sun_path holds 108 bytes with the NUL
	JGT  goruntime
	MOVQ AX, SOCKLEN(SP)
nextenv:
	ADDQ $8, R8
	JMP  env
envdone:

	// fd 3: dockerd's pipe.
	MOVQ $3, DI
	LEAQ STATBUF(SP), SI
	MOVQ $5, AX              // fstat
	SYSCALL
	CMPQ AX, $0
	JNE  goruntime
	MOVL (STATBUF+24)(SP), AX // st_mode
	ANDL $0xf000, AX
	CMPL AX, $0x1000         // S_IFIFO
	JNE  goruntime

	// From here a stop signal waits on a signalfd; a write to a closed pipe fails, not kills.
	MOVQ $0x4002, AX         // SIGINT, SIGTERM
	MOVQ AX, SIGSET(SP)
	MOVQ $0, DI              // SIG_BLOCK
	LEAQ SIGSET(SP), SI
	XORQ DX, DX
	MOVQ $8, R10
	MOVQ $14, AX             // rt_sigprocmask
	SYSCALL
	MOVQ $-1, DI
	LEAQ SIGSET(SP), SI
	MOVQ $8, DX
	MOVQ $0x80800, R10       // SFD_CLOEXEC | SFD_NONBLOCK
	MOVQ $289, AX            // signalfd4
	SYSCALL
	CMPQ AX, $0
	JLT  undo
	MOVQ AX, BX
	MOVQ $1, (KACT+0)(SP)    // SIG_IGN
	MOVQ $0, (KACT+8)(SP)
	MOVQ $0, (KACT+16)(SP)
	MOVQ $0, (KACT+24)(SP)
	MOVQ $13, DI             // SIGPIPE
	LEAQ KACT(SP), SI
	XORQ DX, DX
	MOVQ $8, R10
	MOVQ $13, AX             // rt_sigaction
	SYSCALL

	// The port's socket.
	TESTQ $FLAG_FD4, R13
	JEQ  bind
	MOVQ $3, SI              // SO_TYPE
	CALL startSockopt<>(SB)
	CMPQ AX, $1              // SOCK_STREAM
	JNE  undo
	MOVQ $30, SI             // SO_ACCEPTCONN
	CALL startSockopt<>(SB)
	CMPQ AX, $1
	JNE  undo
	MOVL $128, GOTLEN(SP)
	MOVQ $4, DI
	LEAQ GOTADDR(SP), SI
	LEAQ GOTLEN(SP), DX
	MOVQ $51, AX             // getsockname
	SYSCALL
	CMPQ AX, $0
	JNE  undo
	MOVWLZX (GOTADDR+2)(SP), AX
	ROLW $8, AX              // the port, in network order
	CMPQ AX, HOSTPORT(SP)
	JNE  undo
	MOVWLZX GOTADDR(SP), AX
	TESTQ $FLAG_HOST6, R13
	JNE  fd4six
	CMPQ AX, $2              // AF_INET
	JNE  undo
	MOVQ ARGV(4), SI
	CALL startIPv4<>(SB)
	CMPQ AX, $0
	JEQ  undo
	CMPL CX, (GOTADDR+4)(SP)
	JNE  undo
	JMP  reuseport
fd4six:
	CMPQ AX, $10             // AF_INET6 (its address is dockerd's to get right)
	JNE  undo
reuseport:
	MOVQ $4, DI
	MOVQ $1, SI              // SOL_SOCKET
	MOVQ $15, DX             // SO_REUSEPORT
	CALL startSetsockopt<>(SB)
	CMPQ AX, $0
	JNE  undo
	JMP  register

bind:
	// sockaddr_in or sockaddr_in6, zeroed.
	MOVQ $0, (SADDR+0)(SP)
	MOVQ $0, (SADDR+8)(SP)
	MOVQ $0, (SADDR+16)(SP)
	MOVQ $0, (SADDR+24)(SP)
	MOVQ HOSTPORT(SP), AX
	ROLW $8, AX
	MOVW AX, (SADDR+2)(SP)
	TESTQ $FLAG_HOST6, R13
	JNE  bindsix
	MOVW $2, SADDR(SP)       // AF_INET
	MOVQ ARGV(4), SI
	CALL startIPv4<>(SB)
	CMPQ AX, $0
	JEQ  undo
	MOVL CX, (SADDR+4)(SP)
	MOVQ $2, DI
	JMP  socket
bindsix:
	MOVW $10, SADDR(SP)      // AF_INET6: "::" or "::1"; other addresses are the Go shim's
	MOVQ ARGV(4), DI
	LEAQ ·startIPv6Any(SB), SI
	CALL startArgIs<>(SB)
	TESTQ AX, AX
	JNE  six
	MOVQ ARGV(4), DI
	LEAQ ·startIPv6Loopback(SB), SI
	CALL startArgIs<>(SB)
	TESTQ AX, AX
	JEQ  undo
	MOVB $1, (SADDR+23)(SP)
six:
	MOVQ $10, DI
socket:
	MOVQ $0x80001, SI        // SOCK_STREAM | SOCK_CLOEXEC
	XORQ DX, DX
	MOVQ $41, AX             // socket
	SYSCALL
	CMPQ AX, $0
	JLT  undo
	MOVQ AX, R15
	MOVQ R15, DI
	MOVQ $1, SI
	MOVQ $2, DX              // SO_REUSEADDR
	CALL startSetsockopt<>(SB)
	CMPQ AX, $0
	JNE  undo
	MOVQ R15, DI
	MOVQ $1, SI
	MOVQ $15, DX             // SO_REUSEPORT
	CALL startSetsockopt<>(SB)
	CMPQ AX, $0
	JNE  undo
	MOVQ $16, DX             // sizeof(sockaddr_in)
	TESTQ $FLAG_HOST6, R13
	JEQ  dobind
	MOVQ R15, DI
	MOVQ $41, SI             // IPPROTO_IPV6
	MOVQ $26, DX             // IPV6_V6ONLY
	CALL startSetsockopt<>(SB)
	CMPQ AX, $0
	JNE  undo
	MOVQ $28, DX             // sizeof(sockaddr_in6)
dobind:
	MOVQ R15, DI
	LEAQ SADDR(SP), SI
	MOVQ $49, AX             // bind
	SYSCALL
	CMPQ AX, $0
	JNE  undo                // in use, say: the Go shim binds again and says so
	MOVQ R15, DI
	MOVQ $65535, SI          // the kernel caps it at somaxconn, as Go's listen does
	MOVQ $50, AX             // listen
	SYSCALL
	CMPQ AX, $0
	JNE  undo

register:
	MOVQ $1, DI              // AF_UNIX
	MOVQ $0x80005, SI        // SOCK_SEQPACKET | SOCK_CLOEXEC
	XORQ DX, DX
	MOVQ $41, AX             // socket
	SYSCALL
	CMPQ AX, $0
	JLT  undo
	MOVQ AX, R14
	MOVW $1, SADDR(SP)       // AF_UNIX
	LEAQ (SADDR+2)(SP), DI
	MOVQ SOCKPTR(SP), SI
	MOVQ SOCKLEN(SP), DX
	CALL startAppend<>(SB)
	MOVB $0, 0(DI)
	MOVQ R14, DI
	LEAQ SADDR(SP), SI
	MOVQ SOCKLEN(SP), DX
	ADDQ $3, DX
	MOVQ $42, AX             // connect
	SYSCALL
	CMPQ AX, $0
	JNE  undo                // no server (yet): the Go shim retries

	// Open.
	LEAQ OUT(SP), DI
	LEAQ ·startOpen(SB), SI
	CALL startAppendString<>(SB)
	MOVQ ARGV(4), SI
	MOVQ ARGV(6), R9
	MOVQ $FLAG_HOST6, R10
	CALL startAppendHostPort<>(SB)
	LEAQ ·startContainer(SB), SI
	CALL startAppendString<>(SB)
	MOVQ ARGV(8), SI
	MOVQ ARGV(10), R9
	MOVQ $FLAG_CONTAINER6, R10
	CALL startAppendHostPort<>(SB)
	LEAQ ·startPID(SB), SI
	CALL startAppendString<>(SB)
	MOVQ DI, R9
	MOVQ $39, AX             // getpid
	SYSCALL
	MOVQ R9, DI
	CALL startAppendUint<>(SB)
	LEAQ ·startVersion(SB), SI
	CALL startAppendString<>(SB)
	MOVQ ·versionRef(SB), SI // *string
	MOVQ 8(SI), DX
	MOVQ 0(SI), SI
	CMPQ DX, $0
	JEQ  dev
	CMPQ DX, $200
	JLE  version
dev:
	MOVQ ·startDev+0(SB), SI
	MOVQ ·startDev+8(SB), DX
version:
	CALL startAppendEscaped<>(SB)
	LEAQ ·startServing(SB), SI
	CALL startAppendString<>(SB)
	LEAQ OUT(SP), SI
	MOVQ DI, DX
	SUBQ SI, DX
	MOVQ DX, OUTLEN(SP)
	MOVQ R14, DI
	MOVQ $0x4000, R10        // MSG_NOSIGNAL
	XORQ R8, R8
	XORQ R9, R9
	MOVQ $44, AX             // sendto
	SYSCALL
	CMPQ AX, OUTLEN(SP)
	JNE  undo

	// The answer, or a stop signal.
	MOVL R14, (POLLFDS+0)(SP)
	MOVL $1, (POLLFDS+4)(SP) // POLLIN
	MOVL BX, (POLLFDS+8)(SP)
	MOVL $1, (POLLFDS+12)(SP)
	MOVQ $2, (TIMESPEC+0)(SP)
	MOVQ $0, (TIMESPEC+8)(SP)
wait:
	LEAQ POLLFDS(SP), DI
	MOVQ $2, SI
	LEAQ TIMESPEC(SP), DX    // ppoll leaves the time remaining in it
	XORQ R10, R10
	MOVQ $8, R8
	MOVQ $271, AX            // ppoll
	SYSCALL
	CMPQ AX, $-4             // EINTR
	JEQ  wait
	CMPQ AX, $0
	JLE  undo                // no answer in 2 s: the Go shim waits out the rest
	MOVWLZX (POLLFDS+14)(SP), AX
	TESTL AX, AX
	JNE  stopped
	MOVQ R14, DI
	LEAQ IN(SP), SI
	MOVQ $INSIZE, DX
	MOVQ $0x40, R10          // MSG_DONTWAIT
	XORQ R8, R8
	XORQ R9, R9
	MOVQ $45, AX             // recvfrom
	SYSCALL
	CMPQ AX, $0
	JLE  undo
	CMPQ AX, $INSIZE
	JGE  undo                // cut short: not ours to read
	MOVQ AX, R9              // the answer's length
	LEAQ IN(SP), SI
	MOVQ R9, DX
	LEAQ ·startReady(SB), DI
	CALL startFindPair<>(SB)
	CMPQ AX, $0
	JLT  undo                // Failed, or not an answer: the Go shim asks again and reports
	CMPQ AX, R9
	JEQ  isready
	LEAQ IN(SP), SI
	CMPB (SI)(AX*1), $'&'
	JNE  undo
isready:
	// The retry window, if any: digits up to the next pair.
	MOVQ $0, HASRETRY(SP)
	LEAQ IN(SP), SI
	MOVQ R9, DX
	LEAQ ·startRetry(SB), DI
	CALL startFindPair<>(SB)
	CMPQ AX, $0
	JLT  keep
	LEAQ IN(SP), SI
	ADDQ AX, SI              // the digits
	MOVQ R9, DX
	SUBQ AX, DX              // what is left
	XORQ CX, CX
digits:
	CMPQ CX, DX
	JEQ  digitsdone
	MOVBLZX (SI)(CX*1), AX
	CMPQ AX, $'&'
	JEQ  digitsdone
	SUBQ $'0', AX
	CMPQ AX, $9
	JHI  keep                // not a number: the window is the Go shim's default
	INCQ CX
	CMPQ CX, $9
	JGT  keep
	JMP  digits
digitsdone:
	CMPQ CX, $0
	JEQ  keep
	MOVQ SI, R8
	MOVQ CX, R10
	LEAQ RETRYENV(SP), DI
	LEAQ ·startRetryEnv(SB), SI
	CALL startAppendString<>(SB)
	MOVQ R8, SI
	MOVQ R10, DX
	CALL startAppend<>(SB)
	MOVB $'m', 0(DI)
	MOVB $'s', 1(DI)
	MOVB $0, 2(DI)
	MOVQ $1, HASRETRY(SP)

keep:
	// The descriptors the idle program holds, at 100 or above, as idle.Enter keeps them.
	MOVQ $-1, KEPTCONN(SP)
	MOVQ $-1, KEPTLISTEN(SP)
	MOVQ $-1, KEPTEXE(SP)
	MOVQ R14, DI
	CALL startKeep<>(SB)
	CMPQ AX, $0
	JLT  unkeep
	MOVQ AX, KEPTCONN(SP)
	MOVQ R15, DI
	CMPQ DI, $0
	JGE  keeplisten
	MOVQ $4, DI
keeplisten:
	CALL startKeep<>(SB)
	CMPQ AX, $0
	JLT  unkeep
	MOVQ AX, KEPTLISTEN(SP)
	MOVQ $-100, DI           // AT_FDCWD
	MOVQ ·startExe+0(SB), SI
	MOVQ $0x280000, DX       // O_PATH | O_CLOEXEC
	XORQ R10, R10
	MOVQ $257, AX            // openat
	SYSCALL
	CMPQ AX, $0
	JLT  unkeep
	MOVQ AX, R9
	MOVQ AX, DI
	CALL startKeep<>(SB)
	MOVQ AX, KEPTEXE(SP)
	MOVQ R9, DI
	MOVQ $3, AX              // close
	SYSCALL
	CMPQ KEPTEXE(SP), $0
	JLT  unkeep

	// Ready.
	LEAQ ·startStatusReady(SB), SI
	CALL startStatus<>(SB)
	MOVQ $3, DI
	MOVQ $3, AX              // close
	SYSCALL
	MOVQ R14, DI
	MOVQ $3, AX
	SYSCALL
	MOVQ R15, DI
	CMPQ DI, $0
	JGE  closelisten
	MOVQ $4, DI
closelisten:
	MOVQ $3, AX
	SYSCALL
	MOVQ BX, DI
	MOVQ $3, AX
	SYSCALL

	// The environment of the shim the idle program may run again.
	LEAQ RESUMEENV(SP), DI
	LEAQ ·startResumeEnv(SB), SI
	CALL startAppendString<>(SB)
	MOVQ KEPTCONN(SP), AX
	CALL startAppendUint<>(SB)
	MOVB $',', 0(DI)
	INCQ DI
	MOVQ KEPTEXE(SP), AX
	CALL startAppendUint<>(SB)
	MOVB $',', 0(DI)
	INCQ DI
	MOVQ KEPTLISTEN(SP), AX
	CALL startAppendUint<>(SB)
	MOVB $0, 0(DI)

	// The block the idle program takes for the kernel's: argc, argv, NULL, envp (and ours), NULL.
	LEAQ BLOCK(SP), DI
	MOVQ ENVC(SP), CX
	CALL startCopyArgs<>(SB)
	LEAQ RESUMEENV(SP), AX
	MOVQ AX, 0(DI)
	ADDQ $8, DI
	CMPQ HASRETRY(SP), $0
	JEQ  maxprocs
	LEAQ RETRYENV(SP), AX
	MOVQ AX, 0(DI)
	ADDQ $8, DI
maxprocs:
	MOVQ ·startMaxProcs+0(SB), AX
	MOVQ AX, 0(DI)
	MOVQ $0, 8(DI)

	MOVQ KEPTCONN(SP), R14
	MOVQ KEPTEXE(SP), R15
	MOVQ KEPTLISTEN(SP), BX
	MOVQ $startMark, R8
	LEAQ BLOCK(SP), SP
	JMP  ·image(SB)

unkeep:
	MOVQ KEPTCONN(SP), DI
	CALL startClose<>(SB)
	MOVQ KEPTLISTEN(SP), DI
	CALL startClose<>(SB)
	MOVQ KEPTEXE(SP), DI
	CALL startClose<>(SB)
	JMP  undo

stopped:
	// As the Go shim does: dockerd hears why, and the shim exits 0.
	LEAQ ·startStatusStopped(SB), SI
	CALL startStatus<>(SB)
	MOVQ $0, DI
	MOVQ $231, AX            // exit_group
	SYSCALL

undo:
	// A stop signal already here is handled now: once in the Go runtime, it would kill the shim
	// before it could ask for it.
	CMPQ BX, $0
	JLT  undone
	MOVQ BX, DI
	LEAQ IN(SP), SI
	MOVQ $128, DX
	MOVQ $0, AX              // read
	SYSCALL
	CMPQ AX, $0
	JGT  stopped
undone:
	MOVQ R14, DI
	CALL startClose<>(SB)
	MOVQ R15, DI
	CALL startClose<>(SB)
	MOVQ BX, DI
	CALL startClose<>(SB)
	MOVQ $1, DI              // SIG_UNBLOCK
	LEAQ SIGSET(SP), SI
	XORQ DX, DX
	MOVQ $8, R10
	MOVQ $14, AX             // rt_sigprocmask
	SYSCALL
	// The Go shim's deadline (EDS_SHIM_TIMEOUT) counts from the fast start's: StartedEnv=<ns> is
	// added to the environment of a block laid out as the kernel's (auxv included), and the Go
	// runtime starts from it.
	LEAQ -128(R12), DI       // above the block: the Go runtime's stack grows down from it
	MOVQ DI, STARTENV(SP)
	LEAQ ·startStartedEnv(SB), SI
	CALL startAppendString<>(SB)
	MOVQ STARTNS(SP), AX
	CALL startAppendUint<>(SB)
	MOVB $0, 0(DI)
	LEAQ BLOCK(SP), DI
	MOVQ ENVC(SP), CX
	CALL startCopyArgs<>(SB)
	MOVQ STARTENV(SP), AX
	MOVQ AX, 0(DI)
	MOVQ $0, 8(DI)
	ADDQ $16, DI
	ADDQ $8, SI              // past envp's NULL: the auxiliary vector, up to AT_NULL
auxv:
	MOVQ 0(SI), AX
	MOVQ 8(SI), CX
	MOVQ AX, 0(DI)
	MOVQ CX, 8(DI)
	ADDQ $16, SI
	ADDQ $16, DI
	TESTQ AX, AX
	JNE  auxv
	LEAQ BLOCK(SP), SP
	XORQ AX, AX
	XORQ BX, BX
	XORQ CX, CX
	XORQ DX, DX
	XORQ R8, R8
	JMP  _rt0_amd64_linux(SB)

goruntime:
	MOVQ R12, SP
	XORQ AX, AX
	XORQ BX, BX
	XORQ CX, CX
	XORQ DX, DX
	XORQ R8, R8
	JMP  _rt0_amd64_linux(SB)

// startCopyArgs copies the kernel's argc, argv with its NULL, and the first CX pointers of envp,
// from R12 to DI; DI ends past them, SI at the next of envp.
TEXT startCopyArgs<>(SB), NOSPLIT|NOFRAME, $0
	MOVQ CX, R8
	MOVQ 0(R12), CX
	MOVQ CX, 0(DI)
	ADDQ $8, DI
	LEAQ 8(R12), SI
	INCQ CX                  // argv and its NULL
	REP; MOVSQ
	MOVQ R8, CX
	REP; MOVSQ
	RET

// startStatus writes the Go string at SI to fd 3, dockerd's status pipe, in one write.
TEXT startStatus<>(SB), NOSPLIT|NOFRAME, $0
	MOVQ 8(SI), DX
	MOVQ 0(SI), SI
	MOVQ $3, DI
	MOVQ $1, AX              // write
	SYSCALL
	RET

// startClose closes DI unless it is negative.
TEXT startClose<>(SB), NOSPLIT|NOFRAME, $0
	CMPQ DI, $0
	JLT  done
	MOVQ $3, AX              // close
	SYSCALL
done:
	RET

// startKeep: AX = a copy of descriptor DI at 100 or above, without close-on-exec (or -errno).
TEXT startKeep<>(SB), NOSPLIT|NOFRAME, $0
	XORQ SI, SI              // F_DUPFD
	MOVQ $100, DX
	MOVQ $72, AX             // fcntl
	SYSCALL
	RET

// startSockopt: AX = getsockopt(4, SOL_SOCKET, SI), or -1.
TEXT startSockopt<>(SB), NOSPLIT|NOFRAME, $0
	MOVQ SI, DX
	MOVQ $4, DI
	MOVQ $1, SI              // SOL_SOCKET
	LEAQ (OPTVAL+8)(SP), R10 // past the return address
	MOVL $0, 0(R10)
	MOVL $4, 4(R10)
	LEAQ 4(R10), R8
	MOVQ $55, AX             // getsockopt
	SYSCALL
	CMPQ AX, $0
	JNE  fail
	MOVL (OPTVAL+8)(SP), AX
	RET
fail:
	MOVQ $-1, AX
	RET

// startSetsockopt: AX = setsockopt(DI, SI, DX, 1) (0 or -errno).
TEXT startSetsockopt<>(SB), NOSPLIT|NOFRAME, $0
	LEAQ (OPTVAL+8)(SP), R10 // past the return address
	MOVL $1, 0(R10)
	MOVQ $4, R8
	MOVQ $54, AX             // setsockopt
	SYSCALL
	RET

// startStrlen: AX = the length of the NUL-terminated string at DI.
TEXT startStrlen<>(SB), NOSPLIT|NOFRAME, $0
	XORQ AX, AX
loop:
	CMPB (DI)(AX*1), $0
	JEQ  done
	INCQ AX
	JMP  loop
done:
	RET

// startHasPrefix: AX = 1 if the NUL-terminated string at DI starts with the Go string at SI, and
// then CX is the prefix's length (uses DX).
TEXT startHasPrefix<>(SB), NOSPLIT|NOFRAME, $0
	MOVQ 8(SI), DX
	MOVQ 0(SI), SI
	XORQ CX, CX
loop:
	CMPQ CX, DX
	JEQ  yes
	MOVBLZX (DI)(CX*1), AX
	CMPB AX, (SI)(CX*1)     // stops at DI's NUL at the latest: no Go string here holds one
	JNE  no
	INCQ CX
	JMP  loop
yes:
	MOVQ $1, AX
	RET
no:
	XORQ AX, AX
	RET

// startArgIs: AX = 1 if the NUL-terminated string at DI is the Go string at SI (uses CX, DX):
// it starts with it, and ends there.
TEXT startArgIs<>(SB), NOSPLIT|NOFRAME, $0
	CALL startHasPrefix<>(SB)
	TESTQ AX, AX
	JEQ  done
	CMPB (DI)(CX*1), $0
	JEQ  done
	XORQ AX, AX
done:
	RET

// startAddress: AX = 1 if the NUL-terminated string at SI is 1 to 45 hex digits, dots and colons
// (an address for the server to parse), and CX = 1 if it holds a colon (IPv6).
TEXT startAddress<>(SB), NOSPLIT|NOFRAME, $0
	XORQ CX, CX
	XORQ DX, DX
loop:
	MOVBLZX (SI)(DX*1), AX
	CMPQ AX, $0
	JEQ  end
	INCQ DX
	CMPQ DX, $45
	JGT  no
	CMPQ AX, $':'
	JNE  notcolon
	MOVQ $1, CX
	JMP  loop
notcolon:
	CMPQ AX, $'.'
	JEQ  loop
	MOVQ AX, R8
	SUBQ $'0', R8
	CMPQ R8, $9
	JLS  loop
	ORQ  $0x20, AX           // lower case
	SUBQ $'a', AX
	CMPQ AX, $5
	JLS  loop
no:
	XORQ AX, AX
	RET
end:
	CMPQ DX, $0
	JEQ  no
	MOVQ $1, AX
	RET

// startPort: AX = the port the NUL-terminated string at SI spells (1 to 5 digits, 1-65535), or -1.
TEXT startPort<>(SB), NOSPLIT|NOFRAME, $0
	XORQ AX, AX
	XORQ CX, CX
loop:
	MOVBLZX (SI)(CX*1), DX
	CMPQ DX, $0
	JEQ  end
	SUBQ $'0', DX
	CMPQ DX, $9
	JHI  no
	IMULQ $10, AX
	ADDQ DX, AX
	INCQ CX
	CMPQ CX, $5
	JGT  no
	JMP  loop
end:
	CMPQ CX, $0
	JEQ  no
	CMPQ AX, $1
	JLT  no
	CMPQ AX, $65535
	JGT  no
	RET
no:
	MOVQ $-1, AX
	RET

// startIPv4: AX = 1 and CX = the address in network order, if the NUL-terminated string at SI is
// a dotted quad (four numbers 0-255 of 1 to 3 digits); else AX = 0. With four parts, CX holds the
// first in its lowest byte: the address as it lies in memory.
TEXT startIPv4<>(SB), NOSPLIT|NOFRAME, $0
	XORQ CX, CX              // the address, built a byte at a time
	XORQ R8, R8              // bytes done
	XORQ R9, R9              // the current number
	XORQ R10, R10            // its digits
	XORQ DX, DX              // position
loop:
	MOVBLZX (SI)(DX*1), AX
	INCQ DX
	CMPQ AX, $0
	JEQ  part
	CMPQ AX, $'.'
	JEQ  part
	SUBQ $'0', AX
	CMPQ AX, $9
	JHI  no
	IMULQ $10, R9
	ADDQ AX, R9
	INCQ R10
	CMPQ R10, $3
	JGT  no
	JMP  loop
part:
	CMPQ R10, $0
	JEQ  no
	CMPQ R9, $255
	JGT  no
	SHRL $8, CX              // the parts so far move down a byte; this one goes on top
	SHLL $24, R9
	ORL  R9, CX
	INCQ R8
	XORQ R9, R9
	XORQ R10, R10
	MOVBLZX -1(SI)(DX*1), AX
	CMPQ AX, $0
	JNE  more
	CMPQ R8, $4
	JNE  no
	MOVQ $1, AX
	RET
more:
	CMPQ R8, $4
	JEQ  no
	JMP  loop
no:
	XORQ AX, AX
	RET

// startAppend copies DX bytes from SI to DI; DI ends past them.
TEXT startAppend<>(SB), NOSPLIT|NOFRAME, $0
	MOVQ DX, CX
	REP; MOVSB
	RET

// startAppendString appends the Go string at SI to DI.
TEXT startAppendString<>(SB), NOSPLIT|NOFRAME, $0
	MOVQ 8(SI), CX
	MOVQ 0(SI), SI
	REP; MOVSB
	RET

// startAppendHostPort appends "IP:PORT", or "[IP]:PORT" when R13 has the flag in R10, from the
// NUL-terminated IP at SI and PORT at R9 (both checked already).
TEXT startAppendHostPort<>(SB), NOSPLIT|NOFRAME, $0
	TESTQ R10, R13
	JEQ  ip
	MOVB $'[', 0(DI)
	INCQ DI
ip:
	MOVBLZX 0(SI), AX
	CMPQ AX, $0
	JEQ  ipdone
	MOVB AX, 0(DI)
	INCQ SI
	INCQ DI
	JMP  ip
ipdone:
	TESTQ R10, R13
	JEQ  colon
	MOVB $']', 0(DI)
	INCQ DI
colon:
	MOVB $':', 0(DI)
	INCQ DI
port:
	MOVBLZX 0(R9), AX
	CMPQ AX, $0
	JEQ  done
	MOVB AX, 0(DI)
	INCQ R9
	INCQ DI
	JMP  port
done:
	RET

// startAppendUint appends AX in decimal to DI.
TEXT startAppendUint<>(SB), NOSPLIT|NOFRAME, $0
	MOVQ AX, R8
	MOVQ $1, R10             // digits
	MOVQ $10, CX
count:
	XORQ DX, DX
	DIVQ CX
	CMPQ AX, $0
	JEQ  counted
	INCQ R10
	JMP  count
counted:
	MOVQ R8, AX
	ADDQ R10, DI
	MOVQ DI, R11
write:
	XORQ DX, DX
	DIVQ CX
	ADDQ $'0', DX
	DECQ R11
	MOVB DX, 0(R11)
	CMPQ AX, $0
	JNE  write
	RET

// startAppendEscaped appends DX bytes from SI to DI as a URL query value: unreserved bytes as
// they are, others as %XX.
TEXT startAppendEscaped<>(SB), NOSPLIT|NOFRAME, $0
	XORQ CX, CX
loop:
	CMPQ CX, DX
	JEQ  done
	MOVBLZX (SI)(CX*1), AX
	INCQ CX
	MOVQ AX, R8
	SUBQ $'0', R8
	CMPQ R8, $9
	JLS  plain
	MOVQ AX, R8
	ORQ  $0x20, R8
	SUBQ $'a', R8
	CMPQ R8, $25
	JLS  plain
	CMPQ AX, $'-'
	JEQ  plain
	CMPQ AX, $'.'
	JEQ  plain
	CMPQ AX, $'_'
	JEQ  plain
	CMPQ AX, $'~'
	JEQ  plain
	MOVB $'%', 0(DI)
	MOVQ AX, R8
	SHRQ $4, R8
	CALL hex<>(SB)
	MOVB R8, 1(DI)
	MOVQ AX, R8
	ANDQ $15, R8
	CALL hex<>(SB)
	MOVB R8, 2(DI)
	ADDQ $3, DI
	JMP  loop
plain:
	MOVB AX, 0(DI)
	INCQ DI
	JMP  loop
done:
	RET

// hex turns R8 (0-15) into its upper-case hex digit.
TEXT hex<>(SB), NOSPLIT|NOFRAME, $0
	CMPQ R8, $9
	JHI  letter
	ADDQ $'0', R8
	RET
letter:
	ADDQ $('A'-10), R8
	RET

// startFindPair: AX = where the first pair of the query at SI (DX bytes) that starts with the Go
// string at DI ends its match (the byte after it), or -1. Pairs start at 0 or after an '&'.
TEXT startFindPair<>(SB), NOSPLIT|NOFRAME, $0
	MOVQ 8(DI), R10          // the pattern's length
	MOVQ 0(DI), DI           // the pattern
	XORQ R8, R8              // where the pair starts
pair:
	MOVQ DX, R11
	SUBQ R8, R11
	CMPQ R11, R10
	JLT  next                // too short for the pattern
	XORQ CX, CX
cmp:
	CMPQ CX, R10
	JEQ  found
	LEAQ (R8)(CX*1), R11
	MOVBLZX (SI)(R11*1), AX
	CMPB AX, (DI)(CX*1)
	JNE  next
	INCQ CX
	JMP  cmp
found:
	MOVQ R8, AX
	ADDQ R10, AX
	RET
next:
	CMPQ R8, DX
	JGE  none
	MOVBLZX (SI)(R8*1), AX
	INCQ R8
	CMPQ AX, $'&'
	JEQ  pair
	JMP  next
none:
	MOVQ $-1, AX
	RET

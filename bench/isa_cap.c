/* Caps the instruction sets this process and its children see, so that every library's kernel dispatch (PyTorch,
 * MKL, oneDNN, OpenVINO, ONNX Runtime's MLAS) takes the path it would take on a CPU without them.
 *
 * Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID; the cpuid_fault flag in /proc/cpuinfo) makes the cpuid
 * instruction raise SIGSEGV in user space. Loaded with LD_PRELOAD, this library turns faulting on before the
 * program's own code runs, and answers each cpuid from the handler: it runs the real instruction with faulting
 * briefly off, clears the feature bits above the cap, and resumes after the instruction. The setting is kept across
 * fork and clone and reset by execve, where LD_PRELOAD loads this library again.
 *
 * PROMPTMUX_ISA_CAP names the cap: "avx2" (AMD Zen 3's set: AVX2, FMA, no AVX-512, VNNI, bf16 or AMX) or
 * "avx512" (AVX-512 with VNNI and bf16, no AMX: Zen 4's set). Only the instruction sets change: the cores, caches
 * and clock stay this machine's.
 *
 * Handlers that others install for SIGSEGV (Python's faulthandler, under pytest) are recorded and called for any
 * fault that is not a cpuid, so this handler stays first. glibc reads cpuid before any library is loaded; its
 * string functions keep their own choice (they do not decide model kernels).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

/* The bits cleared, per (leaf, subleaf, register). */
struct mask {
    uint32_t leaf, subleaf;
    uint32_t eax, ebx, ecx, edx;
};

/* Leaf 7.0 EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31.
 * Leaf 7.0 ECX: VBMI 1, VBMI2 6, GFNI 8, VNNI 11, BITALG 12, VPOPCNTDQ 14.
 * Leaf 7.0 EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, AVX512-FP16 23, AMX-TILE 24, AMX-INT8 25.
 * Leaf 7.1 EAX: AVX-VNNI 4, AVX512-BF16 5, AMX-FP16 21, AVX-IFMA 23. Leaf 7.1 EDX: AVX-VNNI-INT8 4,
 * AVX-NE-CONVERT 5, AMX-COMPLEX 8, AVX10 19. */
#define AVX512_EBX (BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31))
#define AVX512_ECX (BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14))
#define AVX512_EDX (BIT(2) | BIT(3) | BIT(8) | BIT(23))
#define AMX_EDX (BIT(22) | BIT(24) | BIT(25))

static const struct mask AVX2_CAP[] = {
    {7, 0, 0, AVX512_EBX, AVX512_ECX | BIT(8), AVX512_EDX | AMX_EDX},
    {7, 1, BIT(4) | BIT(5) | BIT(21) | BIT(23), 0, 0, BIT(4) | BIT(5) | BIT(8) | BIT(19)},
};
static const struct mask AVX512_CAP[] = {
    {7, 0, 0, 0, 0, AMX_EDX | BIT(23)},
    {7, 1, BIT(21), 0, 0, BIT(8) | BIT(19)},
};

static const struct mask *cap_masks;
static size_t cap_count;
static char cap_name[16];
static struct sigaction chained; /* the SIGSEGV handler the program asked for */

/* The cap in force, for promptmux.runtime.cpu to find in the process (NULL: none). */
const char *promptmux_isa_cap(void) { return cap_masks ? cap_name : NULL; }

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static sigaction_fn real_sigaction(void) {
    static sigaction_fn real;
    if (!real)
        real = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return real;
}

static void cpuid(uint32_t leaf, uint32_t subleaf, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(subleaf));
}

static void capped_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t r[4]) {
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    cpuid(leaf, subleaf, r);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    for (size_t i = 0; i < cap_count; i++) {
        const struct mask *m = &cap_masks[i];
        if (m->leaf == leaf && m->subleaf == subleaf) {
            r[0] &= ~m->eax;
            r[1] &= ~m->ebx;
            r[2] &= ~m->ecx;
            r[3] &= ~m->edx;
        }
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *g = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    if (info->si_code == SI_KERNEL && ip && ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t r[4];
        capped_cpuid((uint32_t)g[REG_RAX], (uint32_t)g[REG_RCX], r);
        g[REG_RAX] = r[0]; /* cpuid zero-extends into the 64-bit registers */
        g[REG_RBX] = r[1];
        g[REG_RCX] = r[2];
        g[REG_RDX] = r[3];
        g[REG_RIP] += 2;
        return;
    }
    if (chained.sa_flags & SA_SIGINFO) {
        chained.sa_sigaction(sig, info, context);
        return;
    }
    if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
        chained.sa_handler(sig);
        return;
    }
    /* A real fault and no other handler: the faulting instruction runs again and the process dies of it, as it
     * would have without this library. */
    struct sigaction dfl = {0};
    dfl.sa_handler = SIG_DFL;
    real_sigaction()(SIGSEGV, &dfl, NULL);
}

/* Others' SIGSEGV handlers are kept as the chained one; ours stays installed. */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (sig != SIGSEGV || !cap_masks)
        return real_sigaction()(sig, act, old);
    if (old)
        *old = chained;
    if (act)
        chained = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    if (sig != SIGSEGV || !cap_masks) {
        static sighandler_t (*real)(int, sighandler_t);
        if (!real)
            real = (sighandler_t(*)(int, sighandler_t))dlsym(RTLD_NEXT, "signal");
        return real(sig, handler);
    }
    sighandler_t before = (chained.sa_flags & SA_SIGINFO) ? SIG_DFL : chained.sa_handler;
    memset(&chained, 0, sizeof chained);
    chained.sa_handler = handler;
    return before;
}

__attribute__((constructor)) static void start(void) {
    const char *name = getenv("PROMPTMUX_ISA_CAP");
    if (!name || !*name)
        return;
    if (!strcmp(name, "avx2")) {
        cap_masks = AVX2_CAP;
        cap_count = sizeof AVX2_CAP / sizeof *AVX2_CAP;
    } else if (!strcmp(name, "avx512")) {
        cap_masks = AVX512_CAP;
        cap_count = sizeof AVX512_CAP / sizeof *AVX512_CAP;
    } else {
        static const char msg[] = "promptmux isa_cap: PROMPTMUX_ISA_CAP must be avx2 or avx512\n";
        (void)!write(2, msg, sizeof msg - 1);
        _exit(2);
    }
    strncpy(cap_name, name, sizeof cap_name - 1);
    struct sigaction act = {0};
    act.sa_sigaction = on_segv;
    act.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&act.sa_mask);
    real_sigaction()(SIGSEGV, &act, NULL);
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        static const char msg[] = "promptmux isa_cap: this kernel or CPU cannot fault on cpuid (no cpuid_fault in "
                                  "/proc/cpuinfo); the instruction sets cannot be capped here\n";
        (void)!write(2, msg, sizeof msg - 1);
        _exit(2);
    }
}

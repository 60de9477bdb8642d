# Optional, where libjemalloc2 is installed:  source scripts/cpu_env.sh
#
# `python -m pure_reasoner.train` and the CPU benchmarks already tune glibc malloc to keep freed pages on huge pages
# (kernels/malloc_tuning.py: nothing to install); a preloaded jemalloc takes precedence over that.
#
# PyTorch's CPU allocator hands big blocks back to the OS on free, so every step re-faults its
# activations and fresh weight gradients page by page (~75 ms per 256 MiB here, and much worse
# when the kernel must compact memory for huge pages: seconds of system time per fwd+bwd in a VM).
# jemalloc that keeps freed pages (no decay) and backs them with huge pages removes that cost:
# the default knowledge-path fwd+bwd (benchmarks.kernels, rate 1, on the MKL path it had before the
# oneDNN change) went from 1.3-4.2 s between identical calls to 1.05-1.2 s.
# Install it with `apt-get install libjemalloc2` (Debian/Ubuntu); without it this file does nothing.
for lib in /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 \
           /usr/lib64/libjemalloc.so.2 /usr/lib/libjemalloc.so.2; do
    if [ -e "$lib" ]; then
        export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
        export MALLOC_CONF="oversize_threshold:0,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1,thp:always"
        echo "cpu_env: jemalloc preloaded ($lib)"
        break
    fi
done
[ -n "$MALLOC_CONF" ] || echo "cpu_env: no libjemalloc.so.2 found; PyTorch's default allocator stays"

"""What fake tensors cannot see, added to a CUDA target's estimate as explicit, printed allowances (a CPU target
gets none): the allocator's rounding and reserve, cuBLAS/cuDNN workspaces, the CUDA context. docs/design.md
section 6 says how they were measured. The planner adds them; the plan's report prints them. Also the byte units
every report and message prints sizes in (fmt_bytes)."""

from __future__ import annotations

GIB = 1024**3
MIB = 1024**2


def fmt_bytes(nbytes: int | float | None) -> str:
    """A short human-readable size: '512 B', '3.00 KiB', '64.00 MiB', '1.23 GiB'; 'n/a' for None."""
    if nbytes is None:
        return "n/a"
    sign = "-" if nbytes < 0 else ""
    n = abs(float(nbytes))
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"


CUDA_BLOCK = 512  # the caching allocator rounds every request up to a multiple of 512 bytes
# reserved ~ allocated x this, with expandable segments (the default): the H100 runs of benchmarks/REPORT.md reserved
# 1.03-1.09x their allocated peak (segment rounding, some fragmentation)
RESERVED_FACTOR = 1.10
# with fixed segments (expandable_segments=false) freed blocks of the large decode tensors fragment: the same runs
# reserved up to 0.26 GiB more than allocated x 1.10 at 512 px, 1.4-1.8 GiB more at SDXL's 1024 px (4x the area)
FIXED_SEGMENTS_BYTES_PER_512PX = 512 * MIB
WORKSPACE_BYTES = 160 * MIB  # cuBLAS workspaces (a few MiB per handle/stream) + the cuDNN conv workspace
CUDA_CONTEXT_BYTES = 400 * MIB  # driver, kernels, cuDNN/cuBLAS handles: outside the allocator

ALLOWANCES = {
    "allocator_rounding": f"every allocation rounded up to {CUDA_BLOCK} B (counted in the allocated estimate)",
    "reserved_factor": f"reserved = allocated x {RESERVED_FACTOR:.2f} (segment rounding, fragmentation; measured "
                       "on an H100, benchmarks/REPORT.md); with expandable_segments=false, "
                       f"+{FIXED_SEGMENTS_BYTES_PER_512PX / MIB:.0f} MiB more per 512x512 px of image (fragmentation)",
    "workspaces": f"+{WORKSPACE_BYTES / MIB:.0f} MiB on top of reserved for cuBLAS/cuDNN workspaces "
                  "(fake tensors do not run kernels, so cannot see them)",
    "cuda_context": f"~{CUDA_CONTEXT_BYTES / MIB:.0f} MiB of CUDA context is NOT in allocated/reserved; the shipped "
                    "profiles' budgets already leave room for it (e.g. rtx3060: 7.5 of 8 GB)",
}

"""Static GPU evidence without a GPU: ``python -m bench compile`` (see :mod:`bench.compile.cli`).

capture   run the real launchers on meta tensors posing as CUDA tensors, record each launch
shapes    the shape classes (model presets, attention sweep) and their drivers
build     bind with Triton's binder, compile for ``GPUTarget("cuda", arch, 32)``, ptxas -v, cuobjdump
asm       parse ptxas output, PTX load widths / MMA kind, the SASS main loop
run       plan + process pool + the checks (``problems``) shared by the report and the CI gate
jvp_loop  attention_jvp inner loop before (commit a30b2fa) / after
report    compile.json + compile.md
"""

"""What the build needs of the runtime (rwkv2rknn/run): checks that run the program against onnxruntime, and
the tokenizers that read its verification and calibration text.

trace.py         every segment's real inputs: the chain on onnxruntime fed tokens (or random inputs)
model_check.py   the whole-model check, in a child process (the simulator is native code that can crash)

This package sits above build/ and run/. build/ never imports the runtime (tests/test_layering.py): its caller
hands it `RUNTIME`, a build.inputs.Runtime (`build_manifest(out, options, runtime=RUNTIME)`; the CLI does so).
"""

from __future__ import annotations


class ChainRuntime:
    """The build's Runtime backed by the runtime's Chain on onnxruntime and its tokenizers."""

    check_module = "rwkv2rknn.verify.model_check"

    def tokenizer(self, hint: str, root, vocab: int):
        from rwkv2rknn.run.tokenizers import load_tokenizer

        return load_tokenizer(hint, root, vocab)

    def segment_inputs(self, manifest, ids: list[int] | None, n_tokens: int, seed: int) -> dict:
        """With `ids` (a whole model), those tokens through the chain; otherwise `n_tokens` random ones (single
        graphs: random realistic inputs). {segment id: [feed per call]}."""
        from rwkv2rknn.verify.trace import record_inputs, trace_segment_inputs

        if ids is not None and manifest.model is not None:
            return record_inputs(manifest, ids)
        return trace_segment_inputs(manifest, n_tokens=n_tokens, seed=seed)


RUNTIME = ChainRuntime()

__all__ = ["RUNTIME", "ChainRuntime"]

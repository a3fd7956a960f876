"""TensorRT plugin for `ai.mpt::MPTPromptConcat`, implemented in Python (IPluginV3).

With this plugin registered, a TensorRT build maps the deployment graph's one MPTPromptConcat node
(see export/mpt_function.py) to one plugin layer instead of inlining the node's ONNX function body
(Gather, MatMul, Mul, Concat). At run time the plugin's `enqueue` launches the Triton kernel
`promptmux.kernels.mpt_triton.mpt_prompt_concat_triton` on TensorRT's CUDA stream.

Inputs, in order: task_ids int64 [B], shared_ids int64 [K], shared [A, T, d], cols [K, T, r],
rows [K, r, d], embeds [B, S, d]; output out [B, T + S, d] with the embeds' type:

    out = concat(shared[shared_ids[task_ids]] * (cols[task_ids] @ rows[task_ids]), embeds, axis=1)

The classes derive from the bindings of whichever TensorRT module is in use (`tensorrt` or
TensorRT-RTX's `tensorrt_rtx_bindings`), so they are made per module by `plugin_classes(trt)`.
Registration is explicit: `register_tensorrt_plugins()`.
"""

from __future__ import annotations

PLUGIN_NAME = "MPTPromptConcat"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "ai.mpt"
NUM_INPUTS = 6
FLOAT_INPUTS = (2, 3, 4, 5)  # shared, cols, rows, embeds
INDEX_INPUTS = (0, 1)  # task_ids, shared_ids

_CLASSES: dict[str, tuple[type, type]] = {}  # trt module name -> (plugin class, creator class)
_CREATORS: dict[str, object] = {}  # trt module name -> the registered creator (kept alive here)


def _trt(trt):
    if trt is None:
        from promptmux.core.trt_compat import import_tensorrt

        trt = import_tensorrt()
    return trt


def plugin_classes(trt=None) -> tuple[type, type]:
    """(MPTPromptConcatPlugin, MPTPromptConcatCreator) deriving from `trt`'s plugin interfaces."""
    trt = _trt(trt)
    if trt.__name__ in _CLASSES:
        return _CLASSES[trt.__name__]

    float_types = {trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16}

    class MPTPromptConcatPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            # The bindings require every attribute to be set on a Python plugin.
            self.plugin_name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.num_outputs = 1
            self.timing_cache_id = ""  # one kernel, no tactics: every instance may share timing entries
            self.metadata_string = ""
            self.phase = phase

        # -- core ------------------------------------------------------------------------------
        def get_capability_interface(self, type):
            return self  # this one object implements CORE, BUILD and RUNTIME

        def clone(self):
            return MPTPromptConcatPlugin(self.phase)  # the plugin has no state besides the phase

        # -- build -----------------------------------------------------------------------------
        def get_output_data_types(self, input_types):
            return [input_types[5]]  # the embeds' type

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            shared, embeds = inputs[2], inputs[5]
            out = trt.DimsExprs(3)
            out[0] = embeds[0]  # B
            out[1] = expr_builder.operation(trt.DimensionOperation.SUM, shared[1], embeds[1])  # T + S
            out[2] = embeds[2]  # d
            return [out]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos in INDEX_INPUTS:
                return desc.type == trt.DataType.INT64  # the graph's indices are int64
            if pos == FLOAT_INPUTS[0]:
                return desc.type in float_types
            # The other float inputs and the output: the same type as `shared` (TensorRT asks in order,
            # so in_out[2] has been decided when pos > 2).
            return desc.type == in_out[FLOAT_INPUTS[0]].desc.type

        def configure_plugin(self, inp, out):
            pass

        def get_workspace_size(self, inp, out):
            return 0

        def get_valid_tactics(self):
            return []

        # -- runtime ---------------------------------------------------------------------------
        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inp, out):
            pass

        def attach_to_context(self, resource_context):
            return self.clone()

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([])  # nothing to store: shapes and types come from the engine

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import torch

            from promptmux.kernels.mpt_triton import mpt_prompt_concat_triton

            device = torch.device("cuda", torch.cuda.current_device())
            args = [_device_tensor(trt, ptr, desc, device) for ptr, desc in zip(inputs, input_desc)]
            out = _device_tensor(trt, outputs[0], output_desc[0], device)
            with torch.cuda.stream(torch.cuda.ExternalStream(stream, device=device)):
                mpt_prompt_concat_triton(*args, out=out)

    class MPTPromptConcatCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.field_names = trt.PluginFieldCollection([])  # the node has no attributes to pass

        def create_plugin(self, name, field_collection, phase):
            return MPTPromptConcatPlugin(phase)

    _CLASSES[trt.__name__] = (MPTPromptConcatPlugin, MPTPromptConcatCreator)
    return _CLASSES[trt.__name__]


def _device_tensor(trt, ptr: int, desc, device):
    """A torch CUDA tensor over memory TensorRT owns (no copy), through __cuda_array_interface__."""
    import torch

    # bf16 has no array-interface type string: view it as int16 and reinterpret.
    typestr, as_dtype = {
        trt.DataType.FLOAT: ("<f4", None),
        trt.DataType.HALF: ("<f2", None),
        trt.DataType.BF16: ("<i2", torch.bfloat16),
        trt.DataType.INT64: ("<i8", None),
        trt.DataType.INT32: ("<i4", None),
    }[desc.type]

    shape = tuple(desc.dims)
    if 0 in shape:  # an empty tensor may come with a null address (a decoder step has no MPT prompt)
        t = torch.empty(shape, dtype={"<f4": torch.float32, "<f2": torch.float16, "<i2": torch.int16,
                                      "<i8": torch.int64, "<i4": torch.int32}[typestr], device=device)
    else:
        class _View:
            __cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (int(ptr), False), "version": 2}

        t = torch.as_tensor(_View(), device=device)
    return t.view(as_dtype) if as_dtype is not None else t


def register_tensorrt_plugins(trt=None) -> object:
    """Register the MPTPromptConcat creator under namespace "ai.mpt" in `trt`'s plugin registry
    (default: the module `promptmux.core.trt_compat.import_tensorrt()` returns). Idempotent; returns
    the registered creator."""
    trt = _trt(trt)
    registry = trt.get_plugin_registry()
    existing = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if existing is not None:
        return existing
    _, creator_cls = plugin_classes(trt)
    creator = creator_cls()
    if not registry.register_creator(creator, PLUGIN_NAMESPACE):
        raise RuntimeError(f"TensorRT ({trt.__name__}) refused to register the {PLUGIN_NAMESPACE}::{PLUGIN_NAME} "
                           f"plugin creator version {PLUGIN_VERSION}; see the TensorRT log above for why")
    _CREATORS[trt.__name__] = creator  # the registry holds a raw pointer: keep the Python object alive
    return creator

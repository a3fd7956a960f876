"""KServe v2 over gRPC (inference.GRPCInferenceService), in the server's own process and event loop, on the same
engine and scheduler as HTTP (kserve.py says what a model takes and gives).

The messages and the servicer base class are the protocol's published service definition as tritonclient ships
it generated (tritonclient.grpc.service_pb2 / service_pb2_grpc; Triton's definition is a superset of KServe's, the
same package, service and field numbers): no message is parsed by hand here. Tensors come as raw_input_contents
(tritonclient's way) or typed contents; outputs go back as raw_output_contents. An error aborts the call with the
status code of the HTTP one (400 INVALID_ARGUMENT, 404 NOT_FOUND, 413 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, 504
DEADLINE_EXCEEDED) and the same message; messages over --max-body-bytes are refused by gRPC itself.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from .api_errors import ApiError
from .kserve import OUTPUT_TYPES, check_model, check_version, infer, metric_task, model_metadata, server_metadata
from .kserve_tensors import DTYPES, bad, decode_bytes, element_count, encode_bytes

log = logging.getLogger("promptmux.serve")

# typed contents per datatype (InferTensorContents), when a client sends no raw_input_contents
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def stubs():
    """(messages, services) modules, or a RuntimeError saying what to install."""
    try:
        import grpc  # noqa: F401
        from tritonclient.grpc import service_pb2, service_pb2_grpc
    except ImportError as e:
        raise RuntimeError(f"--grpc-port needs grpcio and the KServe v2 stubs tritonclient ships ({e.name} is "
                           "missing): pip install 'promptmux[grpc]'") from None
    return service_pb2, service_pb2_grpc


def _codes():
    import grpc

    return {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
            499: grpc.StatusCode.CANCELLED, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


def _inputs(request) -> dict[str, np.ndarray]:
    """{name: array in its shape} from a ModelInferRequest."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise bad("raw_input_contents", f"{len(raw)} raw tensors for {len(request.inputs)} inputs")
    if not request.inputs:
        raise bad("inputs", "give at least one input tensor")
    arrays = {}
    for i, tensor in enumerate(request.inputs):
        field = f"inputs[{tensor.name!r}]"
        if tensor.datatype not in DTYPES:
            raise bad(f"{field}.datatype", f"unknown datatype {tensor.datatype!r}; one of {', '.join(DTYPES)}")
        if not raw and tensor.datatype not in CONTENTS:
            # the protocol has no typed field for FP16 (nor BF16): such tensors come only as raw bytes
            raise bad(f"{field}.contents", f"{tensor.datatype} has no typed contents field in KServe v2; "
                                           "send it in raw_input_contents")
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            raise bad(f"{field}.shape", "give the shape as whole numbers, 0 or more")
        count = element_count(shape, field)
        if raw:
            if tensor.datatype == "BYTES":
                array = decode_bytes(raw[i], count, field)
            else:
                dtype = np.dtype(DTYPES[tensor.datatype]).newbyteorder("<")
                if len(raw[i]) != count * dtype.itemsize:
                    raise bad(field, f"{len(raw[i])} bytes for shape {shape} of {tensor.datatype} "
                                     f"({count * dtype.itemsize} bytes)")
                array = np.frombuffer(raw[i], dtype=dtype).astype(DTYPES[tensor.datatype])
        else:
            values = list(getattr(tensor.contents, CONTENTS[tensor.datatype]))
            if len(values) != count:
                raise bad(f"{field}.contents", f"{len(values)} values for shape {shape} ({count} values)")
            array = np.array(values, dtype=DTYPES[tensor.datatype])
        if tensor.name in arrays:
            raise bad(field, "given twice")
        arrays[tensor.name] = array.reshape(shape)
    return arrays


def _raw(dtype: str, array: np.ndarray) -> bytes:
    if dtype == "BYTES":
        return encode_bytes(array.reshape(-1))
    return np.ascontiguousarray(array, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")).tobytes()


def servicer(app, metrics):
    """A GRPCInferenceService servicer over the app's engine (made in the app's lifespan)."""
    import grpc

    pb, rpc = stubs()
    codes = _codes()

    def engine():
        from .replica import engine_ready

        return engine_ready(app)

    async def call(name: str, task: str, context, work):
        """Run work(), answer its errors as gRPC statuses, and count the call like an HTTP request."""
        start, status, error = time.perf_counter(), 200, None
        try:
            return await work()
        except ApiError as e:
            status, error = e.status, e.type
            text = e.message if e.field is None or e.message.startswith(e.field) else f"{e.field}: {e.message}"
            await context.abort(codes.get(e.status, codes[400]), text)
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            status, error = 499, "cancelled"
            raise
        except Exception:
            status, error = 500, "internal"
            log.exception("error serving gRPC %s", name)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            label = metric_task(app.state.engine, task) if app.state.engine is not None else ""
            metrics.record(f"grpc:{name}", label, status, time.perf_counter() - start, error)

    class Servicer(rpc.GRPCInferenceServiceServicer):
        async def ServerLive(self, request, context):
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request, context):
            try:
                engine()
            except ApiError:
                return pb.ServerReadyResponse(ready=False)
            return pb.ServerReadyResponse(ready=True)

        async def ModelReady(self, request, context):
            async def work():
                try:  # an unknown task or version is a model that is not ready, as over HTTP (a 404 there)
                    check_version(request.version)
                    check_model(engine(), request.name, "name")
                except ApiError as e:
                    if e.status == 404:
                        return pb.ModelReadyResponse(ready=False)
                    raise
                return pb.ModelReadyResponse(ready=True)
            return await call("ModelReady", request.name, context, work)

        async def ServerMetadata(self, request, context):
            return pb.ServerMetadataResponse(**server_metadata())

        async def ModelMetadata(self, request, context):
            async def work():
                check_version(request.version)
                md = model_metadata(engine(), request.name)
                tensors = {k: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in md[k]] for k in ("inputs",
                                                                                                         "outputs")}
                return pb.ModelMetadataResponse(name=md["name"], versions=md["versions"], platform=md["platform"],
                                                **tensors)
            return await call("ModelMetadata", request.name, context, work)

        async def ModelInfer(self, request, context):
            async def work():
                check_version(request.model_version)
                eng = engine()
                wanted = [o.name for o in request.outputs] or list(OUTPUT_TYPES)
                for i, name in enumerate(wanted):
                    if name not in OUTPUT_TYPES:
                        raise bad(f"outputs[{i}].name", f"{name!r} is not an output; one of {', '.join(OUTPUT_TYPES)}")
                out = await infer(eng, request.model_name, _inputs(request), wanted, _wait(eng, context))
                return pb.ModelInferResponse(
                    model_name=request.model_name, model_version="1", id=request.id,
                    outputs=[pb.ModelInferResponse.InferOutputTensor(name=n, datatype=OUTPUT_TYPES[n],
                                                                     shape=list(out[n].shape)) for n in wanted],
                    raw_output_contents=[_raw(OUTPUT_TYPES[n], out[n]) for n in wanted])
            return await call("ModelInfer", request.model_name, context, work)

    return Servicer(), rpc


def _wait(engine, context):
    """Await a job within the request timeout; a cancelled call (client gone, deadline) drops the job's work."""
    timeout = engine.options.request_timeout

    async def wait(future, cancel):
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            cancel()
            raise ApiError(504, "timeout", None, f"the request took longer than {timeout:g} s") from None
        except asyncio.CancelledError:
            cancel()
            raise
    return wait


async def start(app, metrics, host: str, port: int, max_message_bytes: int):
    """Serve gRPC on host:port (0: any free port) in this event loop: (server, the port bound)."""
    import grpc

    service, rpc = servicer(app, metrics)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max(max_message_bytes, 64 << 20))])
    rpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if not bound:
        raise RuntimeError(f"--grpc-port {port}: cannot listen on {host}:{port} (in use?)")
    await server.start()
    return server, bound

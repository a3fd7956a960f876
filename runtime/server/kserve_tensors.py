"""Tensors of the KServe v2 / Open Inference Protocol over HTTP: JSON data and Triton's binary tensor extension.

An infer request is JSON, or (binary extension, tritonclient's default) a JSON header of
`Inference-Header-Content-Length` bytes followed by each binary input's bytes in input order, its size in the
input's `parameters.binary_data_size`. BYTES elements in binary are a 4-byte little-endian length and the bytes.
A response is binary the same way for outputs asked with `parameters.binary_data` (or every output where the
request's `parameters.binary_data_output` is true). Every fault raises ApiError(400) naming the input.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from .api_errors import ApiError

HEADER = "Inference-Header-Content-Length"
DTYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}


def bad(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", field, f"{field}: {message}")


def _shape(tensor: dict, field: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad(f"{field}.shape", "give the shape as a list of whole numbers, 0 or more")
    return shape


def element_count(shape: list[int], field: str) -> int:
    """The elements a shape holds, counted in Python's integers: numpy's product wraps past 2**63 (to 0 for
    [2**32, 2**32], which then passed the data checks and failed reshaping, a 500)."""
    count = math.prod(int(d) for d in shape)
    if count > 1 << 31:
        raise bad(f"{field}.shape", f"shape {shape} holds {count:,} elements, more than a request carries")
    return count


def decode_bytes(raw: bytes, count: int, field: str) -> np.ndarray:
    """BYTES elements from the binary form: count times a uint32 length (little-endian) and that many bytes."""
    out, at = [], 0
    for _ in range(count):
        if at + 4 > len(raw):
            raise bad(field, "binary BYTES data ends inside an element's length")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > len(raw):
            raise bad(field, "binary BYTES data ends inside an element")
        out.append(raw[at:at + n])
        at += n
    if at != len(raw):
        raise bad(field, f"binary BYTES data holds more than the shape's {count} elements")
    return np.array(out, dtype=np.object_)


def encode_bytes(items) -> bytes:
    parts = []
    for x in items:
        b = x if isinstance(x, bytes) else str(x).encode()
        parts += [struct.pack("<I", len(b)), b]
    return b"".join(parts)


def _flat(data, field: str) -> list:
    """JSON data, flat or nested row-major, as one flat list."""
    if not isinstance(data, list):
        raise bad(f"{field}.data", "give the data as a list")
    flat: list = []
    stack = [data]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(reversed(x))
        else:
            flat.append(x)
    return flat


def _from_json(tensor: dict, dtype: str, count: int, field: str) -> np.ndarray:
    flat = _flat(tensor.get("data"), field)
    if len(flat) != count:
        raise bad(f"{field}.data", f"{len(flat)} values for shape {tensor['shape']} ({count} values)")
    if dtype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise bad(f"{field}.data", "BYTES data in JSON are strings")
        return np.array([x.encode("utf-8", "surrogatepass") for x in flat], dtype=np.object_)
    if dtype.startswith(("INT", "UINT")) and not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
        raise bad(f"{field}.data", f"{dtype} data are whole numbers")
    try:
        return np.array(flat, dtype=DTYPES[dtype])
    except (OverflowError, ValueError, TypeError):
        raise bad(f"{field}.data", f"the values do not fit {dtype}") from None


def parameters_of(obj: dict, field: str) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad(f"{field}.parameters", "give parameters as an object")
    return params


def parse_request(body: bytes, header_length: str | None) -> tuple[dict, dict[str, np.ndarray]]:
    """(the request's JSON, {input name: array in its shape}) from an HTTP infer body."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise bad(HEADER, f"{header_length!r} is not a length within the body's {len(body)} bytes")
        head, rest = body[:int(header_length)], body[int(header_length):]
    else:
        head, rest = body, b""
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "invalid_json", "body", f"body: malformed JSON: {e}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise bad("inputs", "give the inputs as a non-empty list of tensors")
    parameters_of(request, "body")
    arrays, at = {}, 0
    for i, tensor in enumerate(request["inputs"]):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise bad(f"inputs[{i}]", "each input is an object with a name, datatype, shape and data")
        field = f"inputs[{tensor['name']!r}]"
        dtype = tensor.get("datatype")
        if dtype not in DTYPES:
            raise bad(f"{field}.datatype", f"unknown datatype {dtype!r}; one of {', '.join(DTYPES)}")
        shape = _shape(tensor, field)
        count = element_count(shape, field)
        size = parameters_of(tensor, field).get("binary_data_size")
        if size is None:
            array = _from_json(tensor, dtype, count, field)
        else:
            if not isinstance(size, int) or size < 0 or at + size > len(rest):
                raise bad(f"{field}.parameters.binary_data_size", f"{size!r} bytes are not in the body's binary "
                                                                  f"part ({len(rest) - at} left)")
            raw = rest[at:at + size]
            at += size
            if dtype == "BYTES":
                array = decode_bytes(raw, count, field)
            else:
                itemsize = np.dtype(DTYPES[dtype]).itemsize
                if size != count * itemsize:
                    raise bad(field, f"{size} bytes for shape {shape} of {dtype} ({count * itemsize} bytes)")
                array = np.frombuffer(raw, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")).astype(DTYPES[dtype])
        if tensor["name"] in arrays:
            raise bad(field, "given twice")
        arrays[tensor["name"]] = array.reshape(shape)
    if at != len(rest):
        raise bad("body", f"{len(rest) - at} bytes after the inputs' binary data that no input claims")
    return request, arrays


def response_body(head: dict, outputs: list[tuple[str, str, np.ndarray, bool]]) -> tuple[bytes, dict]:
    """(body, headers) of an infer response: outputs as (name, datatype, array, binary)."""
    tensors, blobs = [], []
    for name, dtype, array, binary in outputs:
        tensor = {"name": name, "datatype": dtype, "shape": list(array.shape)}
        if binary:
            raw = encode_bytes(array.reshape(-1)) if dtype == "BYTES" else \
                np.ascontiguousarray(array, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            flat = array.reshape(-1)
            tensor["data"] = [x.decode() if isinstance(x, bytes) else x for x in flat.tolist()]
        tensors.append(tensor)
    text = json.dumps({**head, "outputs": tensors}, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return text, {"content-type": "application/json"}
    return text + b"".join(blobs), {"content-type": "application/octet-stream", HEADER: str(len(text))}

// Helpers shared by the ATen CPU implementations in csrc/cpu/: float-dtype dispatch without
// ATen/Dispatch.h, raising a core::Status as a Python exception, and the common output factory.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <utility>

#include "../core/status.h"
#include "../core/tree.h"

namespace sage_ext::cpu {

// Calls fn(T{}) with T the C++ type of a float32 / float16 / bfloat16 dtype.
template <typename Fn>
decltype(auto) dispatch_float_dtype(c10::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case c10::kFloat:
      return fn(float{});
    case c10::kHalf:
      return fn(c10::Half{});
    case c10::kBFloat16:
      return fn(c10::BFloat16{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

// Raises ValueError "<op>: <status message>" (row-qualified when the op is batched).
inline void raise_if_error(const core::Status& status, const char* op, int64_t batch_row = -1) {
  if (status.ok()) return;
  if (batch_row >= 0) {
    TORCH_CHECK_VALUE(false, op, ": batch row ", batch_row, ": ", status.message());
  }
  TORCH_CHECK_VALUE(false, op, ": ", status.message());
}

// Raises (naming `parents` and the batch row) unless every row of the contiguous [B, N] int64
// tensor is a valid tree.
inline void validate_parent_rows(const char* op, const at::Tensor& parents) {
  const int64_t* data = parents.const_data_ptr<int64_t>();
  const int64_t n = parents.size(1);
  for (int64_t b = 0; b < parents.size(0); ++b) raise_if_error(core::validate_parents(data + b * n, n), op, b);
}

// Uninitialized tensor of `sizes` and `dtype` on the device of `like`.
inline at::Tensor empty_on(const at::Tensor& like, at::IntArrayRef sizes, c10::ScalarType dtype) {
  return at::empty(sizes, at::TensorOptions().dtype(dtype).device(like.device()));
}

// A tensor whose innermost dimension is contiguous (a copy only when it is not): rows may then be
// read with the outer strides, so e.g. logits[:, -1, :] of a [B, T, V] tensor is never copied.
inline at::Tensor with_contiguous_last_dim(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

}  // namespace sage_ext::cpu

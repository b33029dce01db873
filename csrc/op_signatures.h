// The C++ signatures of the sage_ext ops that native callers (the engine's TreeWorkspace) call through the
// dispatcher: the unboxed form of their schemas in python/bindings.cpp (the one list of schemas, docs/OPS.md).
// c10::OperatorHandle::typed<Sig>() checks each against its registered schema when the handle is made, so a
// signature that drifts from its schema fails on first use with both spelled out.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace sage_ext {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using TensorQuad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptionalTensor = std::optional<at::Tensor>;

using SageLevelSig = TensorTriple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const OptionalTensor&, const at::Tensor&, const OptionalTensor&, int64_t, int64_t,
                                  int64_t, int64_t, int64_t, double, double, double, double, double, double);
using ExpandLevelSig = TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, int64_t, int64_t, double, int64_t, int64_t);
using GatherLevelSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                  int64_t, double);
using RerankSelectSig = TensorQuad(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, int64_t);
using TreeMaskFeedSig = void(const at::Tensor&, const at::Tensor&, const OptionalTensor&, int64_t, int64_t, int64_t);
using TreeBuffersSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor>(const at::Tensor&, int64_t, c10::ScalarType);
using VerifyGreedySig = TensorTriple(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using KvCompactSig = void(at::TensorList, const at::Tensor&, int64_t);
using CommitTreeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, int64_t, at::TensorList, int64_t, at::TensorList,
                                 const OptionalTensor&, int64_t, const OptionalTensor&);

}  // namespace sage_ext

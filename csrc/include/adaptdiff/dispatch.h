#pragma once
// The one dtype dispatch of the project. Callers check the dtype first (checks.h), so the
// default branch is unreachable from Python. Accumulate in at::opmath_type<scalar_t>.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#define ADAPTDIFF_DISPATCH_FLOATING(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                      \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::Double, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

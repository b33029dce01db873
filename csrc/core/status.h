// Status: the error channel of the torch-free core. Validation functions return a Status whose
// message names the offending argument; the ATen layer (csrc/cpu) turns it into a Python exception,
// the C++ unit tests (tests/cpp) inspect it directly.
#pragma once
#include <string>
#include <utility>

namespace sage_ext::core {

class Status {
 public:
  static Status Ok() { return Status(); }
  static Status Error(std::string message) { return Status(std::move(message)); }

  bool ok() const { return message_.empty(); }
  const std::string& message() const { return message_; }

 private:
  Status() = default;
  explicit Status(std::string message) : message_(std::move(message)) {
    if (message_.empty()) message_ = "unknown error";
  }
  std::string message_;
};

}  // namespace sage_ext::core

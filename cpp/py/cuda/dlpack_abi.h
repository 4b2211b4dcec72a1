// adamcpp: the DLPack 1.x binary interface (the structs and codes a DLPack
// capsule carries), declared from the DLPack specification. Plain C++, no
// includes beyond <cstdint>: the CUDA unit imports and exports arrays with it.
#pragma once

#include <cstdint>

namespace adamcpp {
namespace dlpack {

// The DLPack version adamcpp reads and writes (major 1: the versioned capsule layout).
constexpr std::uint32_t kMajor = 1;
constexpr std::uint32_t kMinor = 0;

// Capsule names: a producer's fresh capsule, and the name a consumer gives it
// when it takes ownership (adamcpp never does: it holds the capsule instead).
constexpr const char* kCapsule = "dltensor";
constexpr const char* kCapsuleVersioned = "dltensor_versioned";
constexpr const char* kUsedCapsule = "used_dltensor";
constexpr const char* kUsedCapsuleVersioned = "used_dltensor_versioned";

// DLDeviceType values adamcpp names in messages or accepts.
enum DeviceType : std::int32_t {
  kCPU = 1,
  kCUDA = 2,
  kCUDAHost = 3,
  kOpenCL = 4,
  kVulkan = 7,
  kMetal = 8,
  kVPI = 9,
  kROCM = 10,
  kROCMHost = 11,
  kExtDev = 12,
  kCUDAManaged = 13,
  kOneAPI = 14,
};

// DLDataTypeCode.
enum TypeCode : std::uint8_t {
  kInt = 0,
  kUInt = 1,
  kFloat = 2,
  kOpaqueHandle = 3,
  kBfloat = 4,
  kComplex = 5,
  kBool = 6
};

// Bits of DLManagedTensorVersioned::flags.
constexpr std::uint64_t kFlagReadOnly = 1u << 0;
constexpr std::uint64_t kFlagIsCopied = 1u << 1;

struct Version {
  std::uint32_t major;
  std::uint32_t minor;
};

struct Device {
  std::int32_t device_type;
  std::int32_t device_id;
};

struct DataType {
  std::uint8_t code;
  std::uint8_t bits;
  std::uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  std::int32_t ndim;
  DataType dtype;
  std::int64_t* shape;
  std::int64_t* strides;  // in elements; null: compact row-major
  std::uint64_t byte_offset;
};

// The unversioned capsule's payload ("dltensor").
struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

// The versioned capsule's payload ("dltensor_versioned").
struct ManagedTensorVersioned {
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned* self);
  std::uint64_t flags;
  Tensor dl_tensor;
};

}  // namespace dlpack
}  // namespace adamcpp

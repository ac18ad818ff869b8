// ONNX Runtime registration of ai.modelsurgeon::SparseQuantMatMul through the ORT C API only.
//
// The library does not link libonnxruntime: ORT hands us its OrtApiBase in RegisterCustomOps and we
// ask for API version 17 (ONNX Runtime 1.17, the first with KernelContext_ParallelFor), so one build
// against the 1.21 headers loads on ORT 1.17 to current. OrtCustomOp::version is 17 for the same
// reason: newer ORTs read only the fields that version had.
//
// Execution providers: kOps lists one OrtCustomOp per EP. The CPU op is always there; a CUDA kernel
// joins by defining MODELSURGEON_WITH_CUDA and linking a sqmm_cuda.cu that implements
// msops_sqmm_compute_cuda (same inputs and layout, see sqmm.h); ORT then picks it for nodes placed on
// the CUDA EP and this CPU kernel elsewhere.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"
#include "sqmm.h"

#define MSOPS_EXPORT extern "C" __attribute__((visibility("default")))

namespace msops {
namespace {

constexpr uint32_t kApiVersion = 17;
constexpr int64_t kInlineMacs = int64_t{1} << 20;  // below this many multiply-adds, no thread pool (docs/spquant.md)
constexpr const char* kDomain = "ai.modelsurgeon";
constexpr const char* kOpName = "SparseQuantMatMul";
const OrtApi* g_api = nullptr;

enum Input { kA = 0, kPacked, kScales, kZeroPoints, kGroupPtr, kGroupIndex, kOutlierRows, kOutlierValues, kBias, kNumInputs };

Isa detect_isa() {
  const char* forced = std::getenv("MODELSURGEON_SQMM_ISA");
  Isa best = Isa::kScalar;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni"))
    best = Isa::kAvx512;
  if (forced) {  // may only lower the level: a forced path the CPU lacks would crash
    Isa want = best;
    if (!std::strcmp(forced, "scalar")) want = Isa::kScalar;
    else if (!std::strcmp(forced, "avx2")) want = Isa::kAvx2;
    else if (!std::strcmp(forced, "avx512")) want = Isa::kAvx512;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512vnni";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// The weight inputs are initializers: the same buffers on every call. Once checked, their data pointers and the
// Problem fields parsed from them are kept, so later calls skip the per-input type and shape queries.
struct WeightCache {
  const void* data[kNumInputs] = {};  // data pointer of every input but A (null: absent)
  Problem weights;                    // the fields filled from them (A, M and Y are per call)
  std::vector<uint8_t> codes8;        // weights.codes8's bytes, where the ISA's kernel reads them (uses_codes8)
};

// One 32-byte vector of int32 lanes (Activations::abcast's element); C++17's allocator honours the alignment.
struct alignas(32) Lanes8 {
  int32_t v[8];
};

// Whether p's codes are worth transposing once for the tile-of-8 kernel (Problem::codes8): on AVX2, where the
// one-token path runs it and its in-register transposition was measured at a quarter of its time, and for blocks
// above 32, whose one-token and many-row path it is on AVX2 and AVX-512 (at block 64 on a Xeon, one token: 1.4-1.6x
// MatMulNBits on SmolLM2's shapes, from 0.6-1.1x; 128 rows: 1.5-2.5x, from 0.9-1.4x). At block 32 AVX-512's own
// one-token kernel stays: this path measured 0.7-1.5x MatMulNBits there against its 1.1-1.8x. Costs the codes' bytes
// a second time in memory.
bool uses_codes8(Isa isa, const Problem& p) {
  if (p.accuracy_level != 4 || p.block % 32 != 0 || p.tile % 8 != 0) return false;
  return isa == Isa::kAvx2 || (isa == Isa::kAvx512 && p.block > 32);
}

struct Kernel {
  int64_t K = 0, N = 0, bits = 4, block = 0, accuracy_level = 4, outliers = 0, tile = 1, scale_code = 0, scale_exponent = 0;
  Isa isa = Isa::kScalar;
  std::atomic<const WeightCache*> cache{nullptr};  // set once, by the first call that validates
  ~Kernel() { delete cache.load(); }
};

OrtStatus* error(const std::string& msg) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string(kOpName) + ": " + msg).c_str());
}

#define MSOPS_TRY(expr)                  \
  do {                                   \
    OrtStatus* _s = (expr);              \
    if (_s) return _s;                   \
  } while (0)

struct TensorView {
  const void* data = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  int64_t numel = 0;
};

OrtStatus* view(const OrtValue* value, TensorView* out) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  MSOPS_TRY(g_api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* s = g_api->GetTensorElementType(info, &out->type);
  if (!s) s = g_api->GetDimensionsCount(info, &rank);
  if (!s) {
    out->shape.resize(rank);
    s = g_api->GetDimensions(info, out->shape.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (s) return s;
  out->numel = 1;
  for (int64_t d : out->shape) out->numel *= d;
  void* data = nullptr;
  MSOPS_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  out->data = data;
  return nullptr;
}

struct Task {
  const Problem* p;
  Activations act;
  Isa isa;
  int64_t chunk;
  int8_t* aq;
  float *af, *ascale, *acorr;
  int64_t row_chunk;
};

void prepare_task(void* data, size_t i) {
  Task* t = static_cast<Task*>(data);
  const int64_t m0 = static_cast<int64_t>(i) * t->row_chunk, m1 = std::min(t->p->M, m0 + t->row_chunk);
  if (t->isa == Isa::kAvx512) prepare_rows_avx512(*t->p, t->aq, t->af, t->ascale, t->acorr, m0, m1);
  else if (t->isa == Isa::kAvx2) prepare_rows_avx2(*t->p, t->aq, t->af, t->ascale, t->acorr, m0, m1);
  else prepare_rows_scalar(*t->p, t->aq, t->af, t->ascale, t->acorr, m0, m1);
}

void column_task(void* data, size_t i) {
  Task* t = static_cast<Task*>(data);
  const int64_t n0 = static_cast<int64_t>(i) * t->chunk, n1 = std::min(t->p->N, n0 + t->chunk);
  if (t->act.tiles) columns_avx512_tiled(*t->p, t->act, n0, n1);
  else if (t->isa == Isa::kAvx512) columns_avx512(*t->p, t->act, n0, n1);
  else if (t->isa == Isa::kAvx2) columns_avx2(*t->p, t->act, n0, n1);
  else columns_scalar(*t->p, t->act, n0, n1);
  epilogue(*t->p, n0, n1);
}

// ORT's intra-op thread pool when the running ORT offers it, else inline.
void parallel_for(OrtKernelContext* ctx, void (*fn)(void*, size_t), size_t total, void* data) {
  if (total > 1 && g_api->KernelContext_ParallelFor) {
    OrtStatus* s = g_api->KernelContext_ParallelFor(ctx, fn, total, 0, data);
    if (!s) return;
    g_api->ReleaseStatus(s);
  }
  for (size_t i = 0; i < total; ++i) fn(data, i);
}

OrtStatus* validate_structure(const Kernel& k, const Problem& p, int64_t tiles, int64_t nnz) {
  if (p.group_ptr[0] != 0 || p.group_ptr[tiles] != nnz) return error("group_ptr must start at 0 and end at the number of kept groups");
  for (int64_t n = 0; n < tiles; ++n)
    if (p.group_ptr[n + 1] < p.group_ptr[n]) return error("group_ptr must be non-decreasing");
  for (int64_t g = 0; g < nnz; ++g) {
    const int64_t b = p.index_u16 ? static_cast<const uint16_t*>(p.group_index)[g] : static_cast<const int32_t*>(p.group_index)[g];
    if (b < 0 || b >= p.n_blocks) return error("group_index out of range [0, ceil(K/block))");
  }
  for (int64_t i = 0; i < p.N * p.R; ++i)
    if (p.outlier_rows[i] >= k.K) return error("outlier_rows out of range [0, K)");
  return nullptr;
}

// Check the weight inputs against the attributes and fill p's weight fields (everything but A, M and Y).
OrtStatus* parse_weights(const Kernel& k, const OrtValue* const* values, Problem* out) {
  TensorView in[kNumInputs];
  bool present[kNumInputs] = {};
  for (int i = kPacked; i < kNumInputs; ++i) {
    if (values[i]) {
      MSOPS_TRY(view(values[i], &in[i]));
      present[i] = true;
    }
  }
  for (int i : {kPacked, kScales, kGroupPtr, kGroupIndex})
    if (!present[i]) return error("missing required input " + std::to_string(i));
  Problem p;
  p.K = k.K; p.N = k.N; p.block = k.block; p.tile = k.tile;
  const int64_t tiles = (p.N + p.tile - 1) / p.tile;
  p.n_blocks = (p.K + p.block - 1) / p.block;
  p.Kp = p.n_blocks * p.block;
  p.accuracy_level = k.accuracy_level == 4 ? 4 : 0;
  const int64_t nnz = in[kGroupIndex].numel, slots = nnz * p.tile;
  if (in[kPacked].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || in[kPacked].numel != slots * (p.block / 2))
    return error("packed must be uint8 [kept groups * tile, block/2]");
  if (in[kScales].numel != slots) return error("scales must have one value per kept group and column of its tile");
  if (k.scale_code) {
    if (in[kScales].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) return error("scales must be uint8 codes with scale_code=1");
    p.scales_u8 = true;
    p.scale_code_bias = static_cast<uint32_t>(127 + k.scale_exponent) << 23;
  } else if (in[kScales].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
    p.scales_f16 = true;
  } else if (in[kScales].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    return error("scales must be float16 or float (or uint8 with scale_code=1)");
  }
  if (in[kGroupPtr].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 || in[kGroupPtr].numel != tiles + 1)
    return error("group_ptr must be int32 [ceil(N / tile) + 1]");
  if (in[kGroupIndex].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16) p.index_u16 = true;
  else if (in[kGroupIndex].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) return error("group_index must be uint16 or int32");
  if (present[kZeroPoints]) {
    if (in[kZeroPoints].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 || in[kZeroPoints].numel != slots)
      return error("zero_points must be int8 [kept groups * tile]");
    p.zero_points = static_cast<const int8_t*>(in[kZeroPoints].data);
  }
  if (present[kOutlierRows] != present[kOutlierValues]) return error("outlier_rows and outlier_values come together");
  if (present[kOutlierRows]) {
    const TensorView &r = in[kOutlierRows], &v = in[kOutlierValues];
    p.R = k.outliers;
    if (r.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || r.numel != 2 * p.N * p.R)
      return error("outlier_rows must be uint8 [2 * N * outliers] (little-endian uint16 rows)");
    if (v.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || v.numel != p.N * p.R) return error("outlier_values must be float [N, outliers]");
    p.outlier_rows = static_cast<const uint16_t*>(r.data);  // x86: little endian
    p.outlier_values = static_cast<const float*>(v.data);
  }
  if (present[kBias]) {
    if (in[kBias].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || in[kBias].numel != p.N) return error("bias must be float [N]");
    p.bias = static_cast<const float*>(in[kBias].data);
  }
  p.packed = static_cast<const uint8_t*>(in[kPacked].data);
  p.scales = in[kScales].data;
  p.group_ptr = static_cast<const int32_t*>(in[kGroupPtr].data);
  p.group_index = in[kGroupIndex].data;
  MSOPS_TRY(validate_structure(k, p, tiles, nnz));
  *out = p;
  return nullptr;
}

OrtStatus* compute(Kernel* k, OrtKernelContext* ctx) {
  size_t n_inputs = 0;
  MSOPS_TRY(g_api->KernelContext_GetInputCount(ctx, &n_inputs));
  const OrtValue* values[kNumInputs] = {};
  const void* data[kNumInputs] = {};
  for (size_t i = 0; i < kNumInputs && i < n_inputs; ++i) {
    MSOPS_TRY(g_api->KernelContext_GetInput(ctx, i, &values[i]));
    if (values[i] && i != kA) {
      void* d = nullptr;
      MSOPS_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(values[i]), &d));
      data[i] = d;
    }
  }
  if (!values[kA]) return error("missing required input 0");
  TensorView A;
  MSOPS_TRY(view(values[kA], &A));
  if (A.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return error("A must be float");
  if (A.shape.empty() || A.shape.back() != k->K) return error("the last dimension of A must be K");
  const WeightCache* cached = k->cache.load(std::memory_order_acquire);
  Problem p;
  if (cached && std::equal(data + 1, data + kNumInputs, cached->data + 1)) {
    p = cached->weights;
  } else {
    MSOPS_TRY(parse_weights(*k, values, &p));
    if (!cached) {
      auto* fresh = new WeightCache();
      std::copy(data, data + kNumInputs, fresh->data);
      fresh->weights = p;
      if (uses_codes8(k->isa, p)) {
        const int64_t slots = p.group_ptr[(p.N + p.tile - 1) / p.tile] * p.tile;
        fresh->codes8.resize(static_cast<size_t>(slots * (p.block / 2)));
        transpose_codes8(p.packed, slots, p.block, fresh->codes8.data());
        fresh->weights.codes8 = fresh->codes8.data();
      }
      const WeightCache* expected = nullptr;
      if (k->cache.compare_exchange_strong(expected, fresh, std::memory_order_acq_rel)) p = fresh->weights;
      else delete fresh;
    }
  }
  p.M = p.K ? A.numel / p.K : 0;
  p.A = static_cast<const float*>(A.data);
  const int64_t tiles = (p.N + p.tile - 1) / p.tile, slots = p.group_ptr[tiles] * p.tile;

  std::vector<int64_t> out_shape(A.shape.begin(), A.shape.end() - 1);
  out_shape.push_back(p.N);
  OrtValue* out = nullptr;
  MSOPS_TRY(g_api->KernelContext_GetOutput(ctx, 0, out_shape.data(), out_shape.size(), &out));
  void* y = nullptr;
  MSOPS_TRY(g_api->GetTensorMutableData(out, &y));
  p.Y = static_cast<float*>(y);
  if (p.M == 0 || p.N == 0) return nullptr;

  // Activations: int8 codes + scales (level 4) or fp32 block sums (level 0), prepared once per call.
  std::vector<int8_t> aq;
  std::vector<float> af, ascale, acorr(static_cast<size_t>(p.M * p.n_blocks));
  Task t{&p, {}, k->isa, 0, nullptr, nullptr, nullptr, acorr.data(), 0};
  if (p.accuracy_level == 4) {
    aq.resize(static_cast<size_t>(p.M * p.Kp));
    ascale.resize(static_cast<size_t>(p.M * p.n_blocks));
    t.aq = aq.data();
    t.ascale = ascale.data();
  } else if (p.Kp != p.K) {
    af.resize(static_cast<size_t>(p.M * p.Kp));
    t.af = af.data();
  }
  t.row_chunk = std::max<int64_t>(1, std::min<int64_t>(p.M, 8));
  parallel_for(ctx, prepare_task, static_cast<size_t>((p.M + t.row_chunk - 1) / t.row_chunk), &t);
  t.act.aq = t.aq;
  t.act.ascale = t.ascale;
  t.act.acorr = t.acorr;
  t.act.af = t.af ? t.af : p.A;
  std::vector<float> apair;
  // (ascale, acorr) side by side: one 8-byte load per group in the AVX-512 per-column loop (block 32, tile 1)
  if (p.accuracy_level == 4 && k->isa == Isa::kAvx512 && p.block == 32 && p.tile == 1) {
    apair.resize(2 * ascale.size());
    for (size_t i = 0; i < ascale.size(); ++i) {
      apair[2 * i] = ascale[i];
      apair[2 * i + 1] = acorr[i];
    }
    t.act.apair = apair.data();
  }
  // Many rows on AVX-512: 16-row tiles share each group's unpacked codes (see columns_avx512_tiled).
  std::vector<int8_t> atile;
  std::vector<float> stile, ctile;
  if (p.accuracy_level == 4 && k->isa == Isa::kAvx512 && p.M >= kTiledMinRows && p.block % 32 == 0 &&
      !uses_tile8_rows(p)) {
    const int64_t tiles = (p.M + kTileRows - 1) / kTileRows;
    atile.resize(static_cast<size_t>(tiles * p.Kp * kTileRows) + 64);
    stile.resize(static_cast<size_t>(tiles * p.n_blocks * kTileRows) + 16);
    ctile.resize(stile.size());
    int8_t* a64 = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(atile.data()) + 63) & ~uintptr_t(63));
    float* s64 = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(stile.data()) + 63) & ~uintptr_t(63));
    float* c64 = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(ctile.data()) + 63) & ~uintptr_t(63));
    tile_rows(p, aq.data(), ascale.data(), acorr.data(), a64, s64, c64, tiles);
    t.act.tiles = tiles;
    t.act.atile = a64;
    t.act.stile = s64;
    t.act.ctile = c64;
  }
  // One row through the tile-of-8 kernel with relaid codes: its activations broadcast once per call, not per tile-group.
  std::vector<Lanes8> abcast;
  if (p.M == 1 && p.codes8) {
    abcast.resize(static_cast<size_t>(p.Kp / 4));
    const int32_t* x = reinterpret_cast<const int32_t*>(aq.data());
    for (size_t i = 0; i < abcast.size(); ++i) std::fill(abcast[i].v, abcast[i].v + 8, x[i]);
    t.act.abcast = abcast[0].v;
  }
  std::vector<int32_t> alanes;
  // Few rows, column tiles on AVX-512: minus the activations summed per vpdpbusd lane (see sqmm.h).
  if (p.accuracy_level == 4 && k->isa == Isa::kAvx512 && !t.act.tiles && has_tile_kernels(p) && !uses_tile8_rows(p)) {
    alanes.resize(static_cast<size_t>(p.M * p.n_blocks * 4));
    for (int64_t mb = 0; mb < p.M * p.n_blocks; ++mb) {
      const int8_t* x = aq.data() + (mb / p.n_blocks) * p.Kp + (mb % p.n_blocks) * 32;
      for (int i = 0; i < 4; ++i) {
        int32_t s = 0;
        for (int r = 0; r < 4; ++r) s += x[4 * i + r] + x[16 + 4 * i + r];
        alanes[mb * 4 + i] = -s;
      }
    }
    t.act.alanes = alanes.data();
  }
  // Small products run on the calling thread: waking the pool costs more than the work it would share.
  const int64_t tasks = p.M * slots * p.block < kInlineMacs ? 1 : std::min<int64_t>(tiles, 64);
  t.chunk = (tiles + tasks - 1) / tasks * p.tile;  // whole tiles per task
  parallel_for(ctx, column_task, static_cast<size_t>((p.N + t.chunk - 1) / t.chunk), &t);
  return nullptr;
}

// ---- OrtCustomOp callbacks ----
OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) {
  auto* k = new Kernel();
  auto attr = [&](const char* name, int64_t* v, bool required) -> OrtStatus* {
    OrtStatus* s = g_api->KernelInfoGetAttribute_int64(info, name, v);
    if (s && !required) { g_api->ReleaseStatus(s); return nullptr; }
    return s;
  };
  OrtStatus* s = attr("K", &k->K, true);
  if (!s) s = attr("N", &k->N, true);
  if (!s) s = attr("block", &k->block, true);
  if (!s) s = attr("bits", &k->bits, false);
  if (!s) s = attr("accuracy_level", &k->accuracy_level, false);
  if (!s) s = attr("outliers", &k->outliers, false);
  if (!s) s = attr("tile", &k->tile, false);
  if (!s) s = attr("scale_code", &k->scale_code, false);
  if (!s) s = attr("scale_exponent", &k->scale_exponent, false);
  if (!s && k->bits != 4) s = error("only bits=4 is supported");
  if (!s && (k->block < 2 || k->block % 2)) s = error("block must be even and >= 2");
  if (!s && (k->K <= 0 || k->N <= 0)) s = error("K and N must be positive");
  if (!s && k->outliers < 0) s = error("outliers must be >= 0");
  if (!s && k->tile < 1) s = error("tile must be >= 1");
  if (!s && k->scale_code != 0 && k->scale_code != 1) s = error("scale_code must be 0 (float scales) or 1 (8-bit codes)");
  // every code a normal float: 2^(scale_exponent) .. 2^(scale_exponent + 15) * 15/8
  if (!s && k->scale_code && (k->scale_exponent < -126 || k->scale_exponent > 112))
    s = error("scale_exponent must be in [-126, 112]");
  if (s) { delete k; return s; }
  k->isa = detect_isa();
  *out = k;
  return nullptr;
}
OrtStatus* ORT_API_CALL compute_kernel(void* kernel, OrtKernelContext* ctx) { return compute(static_cast<Kernel*>(kernel), ctx); }
void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }
void* ORT_API_CALL create_kernel_v1(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*) { return nullptr; }  // unused (V2)
void ORT_API_CALL compute_kernel_v1(void*, OrtKernelContext*) {}
const char* ORT_API_CALL op_name(const OrtCustomOp*) { return kOpName; }
const char* ORT_API_CALL cpu_ep(const OrtCustomOp*) { return "CPUExecutionProvider"; }
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return kNumInputs; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }
ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t i) {
  switch (i) {
    case kA: case kBias: case kOutlierValues: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case kPacked: case kOutlierRows: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case kZeroPoints: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    case kGroupPtr: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // scales float16/float/uint8, group_index uint16/int32
  }
}
ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_characteristic(const OrtCustomOp*, size_t i) {
  return (i == kZeroPoints || i == kOutlierRows || i == kOutlierValues || i == kBias) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_characteristic(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtMemType ORT_API_CALL input_memory_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL variadic_min_arity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL variadic_homogeneity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return 2147483647; }

OrtCustomOp make_op(const char* (ORT_API_CALL* ep)(const OrtCustomOp*)) {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof op);
  op.version = kApiVersion;
  op.CreateKernel = create_kernel_v1;
  op.GetName = op_name;
  op.GetExecutionProviderType = ep;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.KernelCompute = compute_kernel_v1;
  op.KernelDestroy = destroy_kernel;
  op.GetInputCharacteristic = input_characteristic;
  op.GetOutputCharacteristic = output_characteristic;
  op.GetInputMemoryType = input_memory_type;
  op.GetVariadicInputMinArity = variadic_min_arity;
  op.GetVariadicInputHomogeneity = variadic_homogeneity;
  op.GetVariadicOutputMinArity = variadic_min_arity;
  op.GetVariadicOutputHomogeneity = variadic_homogeneity;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute_kernel;
  op.InferOutputShapeFn = nullptr;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  return op;
}

OrtCustomOp g_cpu_op = make_op(cpu_ep);
#ifdef MODELSURGEON_WITH_CUDA
const char* ORT_API_CALL cuda_ep(const OrtCustomOp*) { return "CUDAExecutionProvider"; }
OrtCustomOp g_cuda_op = make_op(cuda_ep);  // its compute is msops_sqmm_compute_cuda (sqmm_cuda.cu)
#endif

std::once_flag g_once;
OrtCustomOpDomain* g_domain = nullptr;
OrtStatus* g_domain_error = nullptr;

}  // namespace
}  // namespace msops

#ifdef MODELSURGEON_WITH_CUDA
extern "C" OrtStatus* msops_sqmm_compute_cuda(void* kernel, OrtKernelContext* ctx);
#endif

MSOPS_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace msops;
  const OrtApi* api = api_base->GetApi(kApiVersion);
  if (!api) {
    const OrtApi* any = api_base->GetApi(1);
    return any ? any->CreateStatus(ORT_FAIL, "modelsurgeon custom ops need ONNX Runtime >= 1.17") : nullptr;
  }
  g_api = api;
  std::call_once(g_once, [] {
    g_domain_error = g_api->CreateCustomOpDomain(kDomain, &g_domain);
    if (!g_domain_error) g_domain_error = g_api->CustomOpDomain_Add(g_domain, &g_cpu_op);
#ifdef MODELSURGEON_WITH_CUDA
    if (!g_domain_error) {
      g_cuda_op.KernelComputeV2 = msops_sqmm_compute_cuda;
      g_domain_error = g_api->CustomOpDomain_Add(g_domain, &g_cuda_op);
    }
#endif
  });
  if (g_domain_error) return g_api->CreateStatus(ORT_FAIL, g_api->GetErrorMessage(g_domain_error));
  return g_api->AddCustomOpDomain(options, g_domain);
}

// Build facts for modelsurgeon.runtime.custom_ops.kernel_info() (read through ctypes, no ORT needed).
MSOPS_EXPORT const char* msops_build_info() {
  static std::string info;
  static std::once_flag once;
  std::call_once(once, [] {
    info = std::string("{\"op\": \"") + msops::kDomain + "::" + msops::kOpName + "\", \"ort_api_version\": " +
           std::to_string(msops::kApiVersion) + ", \"isa\": \"" + msops::isa_name(msops::detect_isa()) + "\", \"cuda\": " +
#ifdef MODELSURGEON_WITH_CUDA
           "true"
#else
           "false"
#endif
           + "}";
  });
  return info.c_str();
}

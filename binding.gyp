{
  "targets": [
    {
      "target_name": "prefopt_native",
      "sources": ["native/addon.cc", "native/gemm.cc", "native/fused.cc", "native/lora.cc", "native/cuda_probe.cc", "native/cuda_device.cc", "native/cuda_emulated.cc", "native/cuda_addon.cc"],
      "cflags_cc": ["-O3", "-std=c++17", "-fno-exceptions", "-ffp-contract=off", "-fno-math-errno"],
      "cflags_cc!": ["-fno-rtti"],
      "libraries": ["-ldl", "-lpthread"],
      "xcode_settings": { "OTHER_CPLUSPLUSFLAGS": ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno"] }
    }
  ]
}

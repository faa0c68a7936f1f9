{
  "targets": [
    {
      "target_name": "tern_native",
      "sources": ["native/addon.cc", "native/kvm_vm.cc", "native/kvm_vcpu.cc", "native/guest_ram.cc", "native/fd_util.cc", "native/fd_passing.cc", "native/page_scan.cc", "native/pwrite_runs.cc", "native/xxh64.cc", "native/js_numbers.cc", "native/vcpu_seccomp.cc", "native/eventfd_watcher.cc", "native/virtqueue.cc", "native/queue_thread.cc", "native/block_queue.cc", "native/net_queue.cc", "native/tap.cc"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_CPP_EXCEPTIONS"],
      "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "cflags_cc!": ["-fno-exceptions"],
      "libraries": ["-lpthread", "-lxxhash"]
    }
  ]
}

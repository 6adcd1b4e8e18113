//! CUDA C++ to PTX or a cubin with NVRTC, loaded with dlopen (`libnvrtc.so.12`, or
//! `libnvrtc.so`, on the loader path). No GPU is needed to compile, so the tests compile
//! every generated kernel on any machine that has the library.

use cudarc::nvrtc::{result, sys};
use std::ffi::{c_char, CStr, CString};

/// What to compile to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// PTX for the virtual architecture `compute_XY` (the driver JIT-compiles it at load;
    /// needs a driver at least as new as this NVRTC).
    Ptx,
    /// Machine code for `sm_XY` exactly (loads on any driver of the same major version:
    /// CUDA's minor-version compatibility covers cubins, not PTX).
    Cubin,
}

/// Whether the NVRTC library can be loaded, as an error that says what to install.
/// cudarc panics on the first NVRTC call when the library is missing; this probes with
/// `cudarc::nvrtc::sys::is_culib_present` (a plain dlopen of each candidate name) first.
pub fn available() -> Result<(), String> {
    // Safety: dlopen of the library; no NVRTC function is called.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err("NVRTC (libnvrtc.so.12) was not found: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc-cu12` \
             and put its lib directory (site-packages/nvidia/cuda_nvrtc/lib) on LD_LIBRARY_PATH"
            .into())
    }
}

/// NVRTC's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32), String> {
    available()?;
    let (mut major, mut minor) = (0, 0);
    // Safety: two out-pointers to live integers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| format!("nvrtcVersion: {e:?}"))?;
    Ok((major, minor))
}

/// Compiles `src` (entry points `extern "C"`) for compute capability `cc` (`(9, 0)` for
/// an H100/H200). The error carries NVRTC's log.
pub fn compile(src: &str, name: &str, cc: (i32, i32), out: Output) -> Result<Vec<u8>, String> {
    available()?;
    let arch = match out {
        Output::Ptx => format!("--gpu-architecture=compute_{}{}", cc.0, cc.1),
        Output::Cubin => format!("--gpu-architecture=sm_{}{}", cc.0, cc.1),
    };
    // CubeCL's CUDA runtime compiles the same text with the architecture, line info and
    // the toolkit's include directory (cubecl-cuda-0.11.3/src/compute/context.rs::
    // compile_to_ptx): f16 kernels `#include <cuda_fp16.h>`, which NVRTC does not have
    // built in.
    let mut options = vec![arch, "-lineinfo".to_string()];
    if let Some(dir) = include_dir() {
        options.push(format!("--include-path={}", dir.display()));
    }
    let csrc = CString::new(src).map_err(|_| format!("{name}: the source contains a NUL byte"))?;
    let cname = CString::new(format!("{name}.cu")).map_err(|_| format!("{name}: the name contains a NUL byte"))?;
    let prog = result::create_program(&csrc, Some(&cname)).map_err(|e| format!("{name}: nvrtcCreateProgram: {e:?}"))?;
    let compiled = (|| {
        // Safety: `prog` is a live program; the options are plain strings.
        if let Err(e) = unsafe { result::compile_program(prog, &options) } {
            // Safety: as above; the log is a NUL-terminated string NVRTC wrote.
            let log = unsafe { result::get_program_log(prog) }.map(|l| c_text(&l)).unwrap_or_default();
            return Err(format!("{name}: NVRTC failed ({e:?}) with {}:\n{log}", options.join(" ")));
        }
        match out {
            // Safety: as above; NVRTC writes the NUL-terminated PTX it sized.
            Output::Ptx => unsafe { result::get_ptx(prog) }
                .map(|p| p.iter().map(|&c| c as u8).collect())
                .map_err(|e| format!("{name}: nvrtcGetPTX: {e:?}")),
            Output::Cubin => {
                let mut n = 0usize;
                // Safety: as above; the buffer is exactly the size NVRTC reported.
                unsafe { sys::nvrtcGetCUBINSize(prog, &mut n) }.result().map_err(|e| format!("{name}: nvrtcGetCUBINSize: {e:?}"))?;
                let mut buf = vec![0u8; n];
                unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) }
                    .result()
                    .map_err(|e| format!("{name}: nvrtcGetCUBIN: {e:?}"))?;
                Ok(buf)
            }
        }
    })();
    // Safety: the program is destroyed once, after its last use.
    let _ = unsafe { result::destroy_program(prog) };
    compiled
}

/// The directory holding `cuda_fp16.h`: `$DSC_CUDA_INCLUDE`, `$CUDA_PATH/include`,
/// `$CUDA_HOME/include` or `/usr/local/cuda/include`, the first that has it. Without a
/// toolkit, the pip wheel `nvidia-cuda-runtime-cu12` has the headers in
/// `site-packages/nvidia/cuda_runtime/include` (point `DSC_CUDA_INCLUDE` there).
pub fn include_dir() -> Option<std::path::PathBuf> {
    let env = |v: &str, sub: &str| std::env::var_os(v).map(|d| std::path::PathBuf::from(d).join(sub));
    [env("DSC_CUDA_INCLUDE", ""), env("CUDA_PATH", "include"), env("CUDA_HOME", "include"), Some("/usr/local/cuda/include".into())]
        .into_iter()
        .flatten()
        .find(|d| d.join("cuda_fp16.h").is_file())
}

fn c_text(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    CStr::from_bytes_until_nul(&[bytes.as_slice(), &[0]].concat()).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

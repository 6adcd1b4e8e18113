//! A NaN or infinity never comes out as logits or tokens: the reference backend stops and
//! names the first node that made one; a device backend stops too.

use dsc_runtime::cli::logits::logits_cmd;
use std::path::Path;

#[test]
fn a_nan_weight_is_named_instead_of_nan_logits() {
    let d = std::env::temp_dir().join(format!("dsc-nonfinite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("model")).unwrap();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/hf/llama_dense");
    std::fs::copy(golden.join("config.json"), d.join("model/config.json")).unwrap();
    // The checkpoint with one element of the final norm's gain set to NaN.
    let bytes = std::fs::read(golden.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    let norm = tensors.iter_mut().find(|t| t.0 == "model.norm.weight").expect("a final norm");
    assert_eq!(norm.1, safetensors::Dtype::F32);
    norm.3[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        tensors.iter().map(|(n, dt, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap())).collect();
    std::fs::write(d.join("model/model.safetensors"), safetensors::tensor::serialize(views, None).unwrap()).unwrap();
    std::fs::write(d.join("ids.json"), "{\"input_ids\": [[1, 2, 3]]}").unwrap();

    let args = crate::outputs::logits_args(&d.join("model"), &d.join("ids.json"), &d.join("logits.safetensors"));
    let e = logits_cmd(&args).unwrap_err();
    assert!(e.contains("non-finite logits") && e.contains("NaN") && e.contains("norm.weight"), "{e}");
    assert!(!d.join("logits.safetensors").exists(), "nothing written");
    // A device backend cannot name the node, but refuses the logits all the same.
    let mut args = args;
    args.model.backend = "wgpu".into();
    let e = logits_cmd(&args).unwrap_err();
    assert!(e.contains("the logits hold NaN") && e.contains("on the wgpu backend"), "{e}");
    assert!(!d.join("logits.safetensors").exists(), "nothing written");
    let _ = std::fs::remove_dir_all(&d);
}

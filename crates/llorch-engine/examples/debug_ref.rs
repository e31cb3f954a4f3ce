use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
fn main() {
    let path = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let dev = Device::Cpu;
    let m = llorch_engine::load(&path, &dev, &mut |_, _| {}).unwrap();
    let text = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids = m.tokenizer.encode(text, true).unwrap();
    println!("ids {:?}", ids);
    let hf = tokenizers::Tokenizer::from_file(
        "/work/shared/models/tokenizers/smollm2-135m/tokenizer.json",
    )
    .unwrap();
    println!("hf  {:?}", hf.encode(text, true).unwrap().get_ids());
    let mut net = m.network;
    let mut s = net.new_seq();
    let ours = net.forward(&mut [(&mut s, &ids[..])]).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut w = ModelWeights::from_gguf(ct, &mut f, &dev).unwrap();
    let theirs = w
        .forward(
            &Tensor::new(&ids[..], &dev).unwrap().unsqueeze(0).unwrap(),
            0,
        )
        .unwrap();
    let a: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = theirs.flatten_all().unwrap().to_vec1().unwrap();
    let amax = |v: &[f32]| {
        v.iter().enumerate().fold(
            (0, f32::MIN),
            |acc, (i, &x)| if x > acc.1 { (i, x) } else { acc },
        )
    };
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    println!(
        "ours argmax {:?} theirs argmax {:?} maxdiff {d}",
        amax(&a),
        amax(&b)
    );
    let mut next = amax(&a).0 as u32;
    for step in 0..5 {
        let pos = ids.len() + step;
        let ours = net.forward(&mut [(&mut s, &[next][..])]).unwrap();
        let theirs = w
            .forward(
                &Tensor::new(&[next][..], &dev)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                pos,
            )
            .unwrap();
        let a: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = theirs.flatten_all().unwrap().to_vec1().unwrap();
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        println!(
            "step {step} ours {:?} theirs {:?} maxdiff {d}",
            amax(&a),
            amax(&b)
        );
        next = amax(&b).0 as u32;
    }
}

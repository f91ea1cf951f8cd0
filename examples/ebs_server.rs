//! Serve an image file as an EBS snapshot over the EBS direct APIs, on
//! 127.0.0.1, until killed: the endpoint `benches/ebs.sh` points both
//! rehydrate and `coldsnap download` at.
//!
//! `cargo run --release --example ebs_server -- IMAGE SNAPSHOT_ID PORT`
//! prints `ready http://127.0.0.1:PORT` once it serves.

use std::path::PathBuf;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, image, snapshot_id, port] = args.as_slice() else {
        return Err("usage: ebs_server IMAGE SNAPSHOT_ID PORT".into());
    };
    let server = rehydrate::store::ebs_server::EbsServer::start(port.parse()?).await?;
    server.add_snapshot(snapshot_id, &PathBuf::from(image))?;
    println!("ready {}", server.endpoint_url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}

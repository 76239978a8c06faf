//! `Credentials::from_docker_config_env` reads `$DOCKER_CONFIG/config.json`.
//! Its own test binary with one test: it sets environment variables.

use oci::Credentials;

#[test]
fn docker_config_env_var_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"127.0.0.1:5000":{"username":"a","password":"b"}}}"#,
    )
    .unwrap();
    // SAFETY: this test binary runs this single test; no other thread reads the environment.
    unsafe { std::env::set_var("DOCKER_CONFIG", dir.path()) };
    let c = Credentials::from_docker_config_env().unwrap();
    assert_eq!(
        c.lookup("docker.io"),
        Some(&oci::Auth::Basic {
            username: "u".into(),
            password: "p".into()
        })
    );
    assert!(c.lookup("127.0.0.1:5000").is_some());

    // no file there: no credentials, not an error
    let empty = tempfile::tempdir().unwrap();
    unsafe { std::env::set_var("DOCKER_CONFIG", empty.path()) };
    assert!(Credentials::from_docker_config_env().unwrap().is_empty());

    // malformed: an error naming the file
    std::fs::write(empty.path().join("config.json"), b"{").unwrap();
    let e = Credentials::from_docker_config_env()
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");

    // $HOME fallback
    unsafe {
        std::env::remove_var("DOCKER_CONFIG");
        std::env::set_var("HOME", dir.path());
    }
    std::fs::create_dir_all(dir.path().join(".docker")).unwrap();
    std::fs::copy(
        dir.path().join("config.json"),
        dir.path().join(".docker/config.json"),
    )
    .unwrap();
    assert!(
        Credentials::from_docker_config_env()
            .unwrap()
            .lookup("docker.io")
            .is_some()
    );
}

//! What every XDP object here needs besides its programs: a panic handler
//! (never reached: the programs do not panic, and the verifier would refuse
//! the loop) and the GPL license that the helpers they call require.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

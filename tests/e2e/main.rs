mod core;
mod loading;
mod process;
mod support;
